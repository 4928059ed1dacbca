"""Registration of this package's components in the OpenMMLab registries it serves."""
import importlib

from mmengine.registry import DATA_SAMPLERS, DATASETS, HOOKS, OPTIM_WRAPPERS, TRANSFORMS
from mmengine.registry import MODELS as ENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as ENGINE_OPTIM_WRAPPER_CONSTRUCTORS


def _register(registry, cls) -> None:
    registry.register_module(name=cls.__name__, module=cls, force=True)


def register_all() -> None:
    """Register ``ConvMAE`` in mmengine's, mmdet's, mmseg's and mmpretrain's MODELS (where installed) and the
    pretrainer in mmengine's MODELS; the layer-decay optimizer-wrapper constructor in all four
    OPTIM_WRAPPER_CONSTRUCTORS; the pretraining dataset, transforms and hooks; and our safe loader as mmengine's
    local checkpoint loader. Safe to call more than once."""
    from .checkpoint import register_safe_mmengine_loader
    from .models import ConvMAE, ConvMAEPretrainer
    from .optim import ConvMAELayerDecayOptimWrapperConstructor
    for cls in (ConvMAE, ConvMAEPretrainer):
        _register(ENGINE_MODELS, cls)
    _register(ENGINE_OPTIM_WRAPPER_CONSTRUCTORS, ConvMAELayerDecayOptimWrapperConstructor)
    for scope in ('mmdet', 'mmseg', 'mmpretrain'):
        try:
            registry = importlib.import_module(f'{scope}.registry')
        except ImportError:
            continue
        _register(registry.MODELS, ConvMAE)
        _register(registry.OPTIM_WRAPPER_CONSTRUCTORS, ConvMAELayerDecayOptimWrapperConstructor)
    _register_training_components()
    # At import, because configs load us through custom_imports, the only hook that runs before the Runner
    # reads `load_from` / `--resume` checkpoints (which mmengine 0.10's own loader refuses under torch >= 2.6).
    register_safe_mmengine_loader()


def _register_training_components() -> None:
    """Pretraining dataset, transforms and hooks, and the bf16 optim wrapper, in mmengine's root registries."""
    from . import amp, data, distributed, engine, knn
    from .models import masking
    _register(OPTIM_WRAPPERS, amp.BF16OptimWrapper)
    distributed.register()
    _register(DATASETS, data.ImageFolderDataset)
    _register(DATA_SAMPLERS, data.SeededSampler)
    for cls in (data.LoadRGBImage, data.MAERandomResizedCrop, data.MAERandomFlip, data.PackMAEInputs,
                masking.RandomBlockMask):
        _register(TRANSFORMS, cls)
    for cls in (engine.AtomicCheckpointHook, engine.NonFiniteLossHook, engine.ReseedHook,
                engine.PlainParamGroupsHook, knn.KNNMonitorHook):
        _register(HOOKS, cls)
