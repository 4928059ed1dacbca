"""ConvMAE (MCMAE) for mmengine, mmdet 3.x and mmseg 1.x.

``import convmae_backbone`` registers ``ConvMAE`` (backbone) in the mmdet and mmseg model registries and the
pretraining components in mmengine's registries.
"""
from .models import ConvMAE, ConvMAEPretrainer, ConvViT  # noqa: I001  (models first: checkpoint uses them)
from .checkpoint import CheckpointError, load_encoder_weights, register_safe_mmengine_loader, safe_torch_load
from .data import ImageFolderDataset, SeededSampler
from .engine import AtomicCheckpointHook, ReseedHook, NonFiniteLossHook
from .optim import ConvMAELayerDecayOptimWrapperConstructor
from .registry import register_all

__version__ = '0.1.0'

register_all()
register_safe_mmengine_loader()

__all__ = ['ConvMAE', 'ConvMAEPretrainer', 'ConvViT', 'CheckpointError', 'load_encoder_weights',
           'safe_torch_load', 'ConvMAELayerDecayOptimWrapperConstructor', 'ImageFolderDataset', 'SeededSampler',
           'AtomicCheckpointHook', 'ReseedHook', 'NonFiniteLossHook', '__version__']
