from .backbone import ConvMAE
from .convvit import ConvViT
from .masking import BlockMask
from .pretrainer import ConvMAEPretrainer

__all__ = ['ConvMAE', 'ConvViT', 'ConvMAEPretrainer', 'BlockMask']
