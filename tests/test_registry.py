"""Every class of ours that a config can name is registered: in mmengine's root registry of its kind (which every
scope falls back to), and the backbone and the optimizer constructor also in mmdet's, mmseg's and mmpretrain's
registries; every class of ours that our configs name resolves from their scope."""
import importlib
import inspect
import pkgutil
from typing import Dict, List, Type

import pytest
from mmcv.transforms import BaseTransform
from mmengine import registry as engine_registry
from mmengine.config import Config
from mmengine.dataset import BaseDataset
from mmengine.hooks import Hook
from mmengine.model import BaseModel, BaseModule, MMDistributedDataParallel
from mmengine.optim import BaseOptimWrapper, DefaultOptimWrapperConstructor
from torch import nn
from torch.utils.data import Sampler

import convmae_backbone
from convmae_backbone.registry import DOWNSTREAM_SCOPES, registries
from convmae_backbone.resources import config_path, model_configs

#: Base class -> the registry kind its subclasses are built from.
KIND_OF = ((BaseModel, 'MODELS'), (Hook, 'HOOKS'), (BaseTransform, 'TRANSFORMS'), (BaseDataset, 'DATASETS'),
           (Sampler, 'DATA_SAMPLERS'), (BaseOptimWrapper, 'OPTIM_WRAPPERS'),
           (DefaultOptimWrapperConstructor, 'OPTIM_WRAPPER_CONSTRUCTORS'),
           (MMDistributedDataParallel, 'MODEL_WRAPPERS'))
#: Classes of ours that subclass a buildable base but are not a config ``type`` under their own name.
NOT_CONFIG_TYPES = {
    'CPUSyncBatchNorm': "replaces 'SyncBN' in distributed runs without CUDA (engine.distributed.use_cpu_sync_bn)",
    'SeededDataset': 'base of the image-folder and tar-shard datasets (datasets.samplers)',
    'SkipUnreadable': 'base of the loading transforms (datasets.transforms)',
}


def our_classes() -> List[Type]:
    """Every class defined in a module of the package."""
    found = []
    for info in pkgutil.walk_packages(convmae_backbone.__path__, 'convmae_backbone.'):
        module = importlib.import_module(info.name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == info.name]
    return found


def config_types() -> Dict[str, str]:
    """Registry name -> scope, for every ``type`` (and optimizer ``constructor``) in the configs of the model
    index."""
    types = {}

    def walk(node, scope):
        if isinstance(node, dict):
            for key in ('type', 'constructor'):  # an optim wrapper names its constructor by registry name too
                if isinstance(node.get(key), str):
                    types[node[key]] = scope
            for value in node.values():
                walk(value, scope)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, scope)

    for name in model_configs():
        cfg = Config.fromfile(config_path(name))
        walk(cfg.to_dict(), cfg.get('default_scope', 'mmengine'))
    return types


def unregistered(classes: List[Type], types: Dict[str, str]) -> List[str]:
    """The classes among ``classes`` that a config could name but their registry does not hold, with the reason."""
    missing = []
    for cls in classes:
        kinds = [kind for base, kind in KIND_OF if issubclass(cls, base)]
        if issubclass(cls, (BaseModule, nn.Module)) and cls.__name__ in types:
            kinds.append('MODELS')
        if not kinds or cls.__name__ in NOT_CONFIG_TYPES:
            continue
        for kind in sorted(set(kinds)):
            if getattr(engine_registry, kind).get(cls.__name__) is not cls:
                missing.append(f'{cls.__qualname__} not in mmengine {kind}')
    return missing


@pytest.fixture(scope='module')
def types():
    return config_types()


def test_every_class_a_config_can_name_is_registered(types):
    classes = our_classes()
    assert {'ConvMAE', 'ConvMAEPretrainer', 'AtomicCheckpointHook', 'RandomBlockMask', 'ImageFolderDataset',
            'SeededSampler', 'BF16OptimWrapper'} <= {cls.__name__ for cls in classes}
    assert unregistered(classes, types) == []


def test_the_check_fails_for_an_unregistered_class(types):
    class ForgottenHook(Hook):
        pass

    class ForgottenLayer(nn.Module):
        pass

    types = dict(types, ForgottenLayer='mmdet')
    assert unregistered([ForgottenHook, ForgottenLayer], types) == [
        'test_the_check_fails_for_an_unregistered_class.<locals>.ForgottenHook not in mmengine HOOKS',
        'test_the_check_fails_for_an_unregistered_class.<locals>.ForgottenLayer not in mmengine MODELS']


@pytest.mark.parametrize('kind, name', [('MODELS', 'ConvMAE'),
                                        ('OPTIM_WRAPPER_CONSTRUCTORS', 'ConvMAELayerDecayOptimWrapperConstructor')])
def test_downstream_scopes_hold_the_backbone_and_the_constructor(kind, name):
    found = registries(kind, downstream=True)
    assert [r.scope for r in found] == ['mmengine', *DOWNSTREAM_SCOPES]
    assert all(r.get(name) is getattr(convmae_backbone, name) for r in found)


def test_our_config_types_resolve_in_their_scope(types):
    """Every class of ours that a config names is what the builder finds from that config's scope."""
    ours = {cls.__name__: cls for cls in our_classes()}
    named = sorted(name for name in types if name in ours)
    assert {'ConvMAE', 'ConvMAEPretrainer', 'ConvMAELayerDecayOptimWrapperConstructor', 'RandomBlockMask',
            'AtomicCheckpointHook', 'SeededSampler'} <= set(named)
    wrong = []
    for name in named:
        kinds = [kind for base, kind in KIND_OF if issubclass(ours[name], base)] or ['MODELS']
        for kind in kinds:
            with getattr(engine_registry, kind).switch_scope_and_registry(types[name]) as registry:
                if registry.get(name) is not ours[name]:
                    wrong.append(f'{name} in {types[name]} {kind}')
    assert wrong == []
