"""ConvMAE (MCMAE) for mmengine, mmdet 3.x and mmseg 1.x.

``import convmae_backbone`` registers its components in the OpenMMLab registries and routes mmengine's local
checkpoint loading through our safe loader (:func:`registry.register_all`).
"""
from .checkpoint import CheckpointError, safe_torch_load
from .data import ImageFolderDataset, SeededSampler
from .engine import AtomicCheckpointHook, NonFiniteLossHook, ReseedHook
from .models import BlockMask, ConvMAE, ConvMAEPretrainer, ConvViT
from .models.weights import load_pretrained
from .optim import ConvMAELayerDecayOptimWrapperConstructor
from .registry import register_all

__version__ = '0.1.0'

register_all()

__all__ = ['ConvMAE', 'ConvMAEPretrainer', 'ConvViT', 'BlockMask', 'CheckpointError', 'load_pretrained',
           'safe_torch_load', 'ConvMAELayerDecayOptimWrapperConstructor', 'ImageFolderDataset', 'SeededSampler',
           'AtomicCheckpointHook', 'ReseedHook', 'NonFiniteLossHook', '__version__']
