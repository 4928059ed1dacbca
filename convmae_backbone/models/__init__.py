from .backbone import ConvMAE
from .convvit import ConvViT
from .masking import BlockMask
from .pretrainer import ConvMAEPretrainer
from .pyramid import SimpleFeaturePyramid
from .timm_model import TimmConvMAE  # registers convmae_base with timm

__all__ = ['ConvMAE', 'ConvViT', 'ConvMAEPretrainer', 'BlockMask', 'SimpleFeaturePyramid', 'TimmConvMAE']
