"""ConvMAE (MCMAE) for mmengine, mmdet 3.x, mmseg 1.x and mmpretrain 1.x.

``import convmae_backbone`` registers its components in the OpenMMLab registries (each class where it is
defined, :mod:`.registry`), routes every scheme of mmengine's
``CheckpointLoader`` through our safe loader
(:func:`.checkpoint.register_safe_mmengine_loader`), registers our models by name in mmpretrain
(:mod:`.apis.hub`) and timm (:mod:`.models.timm_model`), and our operations' FLOPs in mmengine's counter
(:mod:`.engine.flops`).

Rooms: :mod:`.models` (layers, encoder, backbone, pretrainer, weights), :mod:`.datasets` (dataset, transforms,
sampler), :mod:`.engine` (hooks, optimizer constructor, mixed precision, distributed), :mod:`.apis` (command-line
logic, conversion, export, deployment, visualisation, names in mmpretrain), :mod:`.checkpoint` (checkpoint
files), :mod:`.resources` (the configs, tools and model index: :func:`config_path`), :mod:`.testing` (synthetic
data and tiny configs for tests and the demo).
"""
from . import version_check  # noqa: F401  first: an ImportError naming the torch needed, if this one is older
from .apis.hub import register_mmpretrain_models
from .checkpoint import CheckpointError, register_safe_mmengine_loader, safe_torch_load
from .datasets import ImageFolderDataset, SeededSampler
from .engine import (AtomicCheckpointHook, ConvMAELayerDecayOptimWrapperConstructor, NonFiniteLossHook, ReseedHook,
                     register_flop_handles)
from .models import BlockMask, ConvMAE, ConvMAEPretrainer, ConvViT
from .models.weights import load_pretrained
from .resources import config_path

__version__ = '0.1.0'

# At import, because configs load us through custom_imports, the only hook that runs before the Runner reads
# `load_from` / `--resume` checkpoints (mmengine 0.10's own loaders are not safe, and refuse its own files under
# torch >= 2.6).
register_safe_mmengine_loader()
# Our models by name in mmpretrain's get_model / list_models / inferencers; our operations in mmengine's FLOP counter.
register_mmpretrain_models()
register_flop_handles()

__all__ = ['ConvMAE', 'ConvMAEPretrainer', 'ConvViT', 'BlockMask', 'CheckpointError', 'load_pretrained',
           'safe_torch_load', 'ConvMAELayerDecayOptimWrapperConstructor', 'ImageFolderDataset', 'SeededSampler',
           'AtomicCheckpointHook', 'ReseedHook', 'NonFiniteLossHook', 'config_path', '__version__']
