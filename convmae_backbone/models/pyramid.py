"""``SimpleFeaturePyramid``: ViTDet's simple feature pyramid over one H/16 map, as an mmdet neck.

Module and parameter names follow the official ViTDet-style ConvMAE detector (detectron2's
``SimpleFeaturePyramid``): ``simfp_{2,3,4,5}`` for strides 4, 8, 16, 32, each an ``nn.Sequential`` whose
convolutions with a norm keep it at ``.norm``, so converting its weights is a renaming.
"""
import math
from typing import Sequence, Tuple

import torch.nn.functional as F
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from torch import Tensor, nn

from ..registry import register


@register('MODELS', downstream=True, name='ConvMAELN2d')
class LayerNorm2d(_TimmLayerNorm2d):
    """LayerNorm over the channels of (B, C, H, W) maps at every position (biased variance), eps 1e-6 by default:
    detectron2's ``'LN'``. Registered as ``'ConvMAELN2d'`` for mmcv norm configs
    (``norm_cfg=dict(type='ConvMAELN2d', eps=1e-6)``; mmcv's default eps is 1e-5), whose ``ConvModule`` s name it
    ``ln``."""


class ConvNorm(nn.Conv2d):
    """A ``k x k`` convolution without bias (stride 1, 'same' padding) followed by a :class:`LayerNorm2d` held at
    ``.norm`` (detectron2's ``Conv2d(norm=...)`` layout: ``weight``, ``norm.weight``, ``norm.bias``).
    (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_eps: float = 1e-6):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = LayerNorm2d(out_channels, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


@register('MODELS', downstream=True)
class SimpleFeaturePyramid(BaseModule):
    """Maps at several strides from the single (B, C, H/16, W/16) map of a plain backbone (ViTDet).

    Each scale factor s gives a path to stride 16 / s: 4 (``ConvTranspose2d`` C -> C/2, :class:`LayerNorm2d`,
    GELU, ``ConvTranspose2d`` C/2 -> C/4, all 2x2 with stride 2), 2 (one such transposed conv, C -> C/2), 1 (none),
    0.5 (2x2 max-pooling); every path then has a 1x1 and a 3x3 :class:`ConvNorm` to ``out_channels``. Levels
    beyond the scale factors (``num_outs``) subsample the last one (max-pooling with kernel 1 and stride 2,
    detectron2's ``LastLevelMaxPool``): ceil(h / 2) x ceil(w / 2).

    Args:
        in_channels: channels C of the input map.
        out_channels: channels of every output map.
        scale_factors: one path per factor, from the finest; factors from {4, 2, 1, 0.5}, in decreasing order.
        num_outs: maps returned (at least ``len(scale_factors)``).
        in_stride: stride of the input map (16), which names the paths ``simfp_{log2(in_stride / s)}``.
        norm_eps: eps of every :class:`LayerNorm2d`.
        init_cfg: mmengine init config (default: PyTorch's initialisation, as officially).

    ``forward`` takes a sequence holding the one input map (a backbone's output tuple) and returns the
    ``num_outs`` maps, finest first.
    """

    PATHS = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, in_channels: int, out_channels: int,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), num_outs: int = 5, in_stride: int = 16,
                 norm_eps: float = 1e-6, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        scale_factors = tuple(float(s) for s in scale_factors)
        if not scale_factors or any(s not in self.PATHS for s in scale_factors) or list(scale_factors) != sorted(
                set(scale_factors), reverse=True):
            raise ValueError(f'scale_factors must be distinct values from {self.PATHS} in decreasing order, got '
                             f'{scale_factors}')
        if num_outs < len(scale_factors):
            raise ValueError(f'num_outs ({num_outs}) must be at least the number of scale factors '
                             f'({len(scale_factors)})')
        self.scale_factors, self.num_outs = scale_factors, num_outs
        self.path_names = []
        c = in_channels
        for scale in scale_factors:
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(c, c // 2, 2, stride=2), LayerNorm2d(c // 2, eps=norm_eps), nn.GELU(),
                          nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2)]
                dim = c // 4
            elif scale == 2.0:
                layers, dim = [nn.ConvTranspose2d(c, c // 2, 2, stride=2)], c // 2
            elif scale == 1.0:
                layers, dim = [], c
            else:
                layers, dim = [nn.MaxPool2d(2, stride=2)], c
            layers += [ConvNorm(dim, out_channels, 1, norm_eps), ConvNorm(out_channels, out_channels, 3, norm_eps)]
            name = f'simfp_{int(math.log2(in_stride / scale))}'
            self.add_module(name, nn.Sequential(*layers))
            self.path_names.append(name)

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """(x,) with x (B, C, h, w) -> ``num_outs`` maps (B, out_channels, h * s, w * s) for the scale factors s,
        then the subsampled levels."""
        if len(inputs) != 1:
            raise ValueError(f'SimpleFeaturePyramid takes the one map of a plain backbone (out_indices=(2,) for '
                             f'ConvMAE), got {len(inputs)} maps')
        outs = [getattr(self, name)(inputs[0]) for name in self.path_names]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
