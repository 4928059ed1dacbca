"""ConvMAE for detectron2: the two official ConvMAE detectors' backbones on the one encoder, their
meta-architecture, and a safe ``DetectionCheckpointer``.

``from convmae_backbone.detectron2 import ConvViT, ConvViTDet`` in place of the official projects' imports
(``projects/ConvMAEDet/modeling/convmae.py``, ``DET/models``) runs the official configs (``configs/detectron2``).
Importing this package registers the yacs builders in detectron2's ``BACKBONE_REGISTRY`` (:mod:`.backbones`) and
makes every ``DetectionCheckpointer`` read files through the safe loader (:mod:`.checkpoint`). The rest of
``convmae_backbone`` never imports it, so the mmdet/mmseg/mmpretrain face works without detectron2.
"""
try:
    import detectron2  # noqa: F401
except ImportError as exc:  # one line saying what to install
    raise ImportError('convmae_backbone.detectron2 needs detectron2, built from source at the commit '
                      '`tools/install_detectron2.sh` pins (no registry release is recent enough): run `bash '
                      f'tools/install_detectron2.sh PYTHON` (`make install` does) ({exc})') from None

from .backbones import (ConvViT, ConvViTDet, add_convmae_config, build_convmae_fpn_backbone,  # noqa: E402
                        build_convmae_vitdet_backbone, get_vit_lr_decay_rate)
from .checkpoint import register_safe_detectron2_checkpointer  # noqa: E402
from .meta_arch import GeneralizedRCNNImageListForward, lsj_postprocess  # noqa: E402

register_safe_detectron2_checkpointer()

__all__ = ['ConvViT', 'ConvViTDet', 'GeneralizedRCNNImageListForward', 'lsj_postprocess', 'get_vit_lr_decay_rate',
           'add_convmae_config', 'build_convmae_vitdet_backbone', 'build_convmae_fpn_backbone',
           'register_safe_detectron2_checkpointer']
