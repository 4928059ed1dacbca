from .backbone import ConvMAE
from .convvit import ConvViT
from .masking import BlockMask
from .pretrainer import ConvMAEPretrainer
from .pyramid import SimpleFeaturePyramid

__all__ = ['ConvMAE', 'ConvViT', 'ConvMAEPretrainer', 'BlockMask', 'SimpleFeaturePyramid']
