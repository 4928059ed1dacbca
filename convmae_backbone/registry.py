"""Registration of this package's components in the OpenMMLab registries it serves."""
import importlib

from mmengine.registry import MODELS as ENGINE_MODELS


def _register(registry, cls) -> None:
    registry.register_module(name=cls.__name__, module=cls, force=True)


def register_all() -> None:
    """Register ``ConvMAE`` in mmengine's, mmdet's and mmseg's MODELS (where installed) and the pretrainer
    in mmengine's MODELS. Safe to call more than once."""
    from .models import ConvMAE, ConvMAEPretrainer
    for cls in (ConvMAE, ConvMAEPretrainer):
        _register(ENGINE_MODELS, cls)
    for scope in ('mmdet', 'mmseg'):
        try:
            registry = importlib.import_module(f'{scope}.registry')
        except ImportError:
            continue
        _register(registry.MODELS, ConvMAE)
