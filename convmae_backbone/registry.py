"""Registration of this package's classes in the OpenMMLab registries they serve.

Every class registers itself where it is defined, with :func:`register`: in mmengine's root registry of that
kind (which every scope's registry falls back to) and, with ``downstream=True``, also in the registries of the
installed :data:`DOWNSTREAM_SCOPES` (their configs look a ``type`` up in their own registry first).
``tests/test_registry.py`` fails for a class of ours that is not registered.
"""
import importlib
from typing import Callable, List, Type

from mmengine import registry as engine_registry
from mmengine.registry import Registry

#: The OpenMMLab scopes whose configs use our components (detection, segmentation, classification).
DOWNSTREAM_SCOPES = ('mmdet', 'mmseg', 'mmpretrain')
#: The scope of the pretraining configs.
PRETRAIN_SCOPES = ('mmengine',)


def registries(kind: str, downstream: bool = False) -> List[Registry]:
    """mmengine's root registry ``kind`` (e.g. ``'MODELS'``), and with ``downstream`` that of every installed
    downstream scope."""
    found = [getattr(engine_registry, kind)]
    for scope in DOWNSTREAM_SCOPES if downstream else ():
        try:
            found.append(getattr(importlib.import_module(f'{scope}.registry'), kind))
        except ImportError:
            continue
    return found


def register(kind: str, downstream: bool = False, name: str = None) -> Callable[[Type], Type]:
    """Class decorator: register the class (as ``name``, default its own name) in :func:`registries`.
    Re-registering replaces (``force=True``), so that reloading a module keeps working."""
    def decorate(cls: Type) -> Type:
        for registry in registries(kind, downstream):
            registry.register_module(name=name or cls.__name__, module=cls, force=True)
        return cls
    return decorate
