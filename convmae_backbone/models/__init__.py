from .backbone import ConvMAE
from .convvit import ConvViT
from .pretrainer import ConvMAEPretrainer

__all__ = ['ConvMAE', 'ConvViT', 'ConvMAEPretrainer']
