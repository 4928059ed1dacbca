"""``ConvMAE``: the ConvMAE encoder as an mmdet/mmseg backbone."""
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from .arch import check_arch, check_weights_fill, infer_arch, parameter_floor
from .convvit import ConvViT
from .weights import pretrained_state, split_init_cfg

#: H/16 positions (stage-3 tokens) along each side that an image must give at least.
MIN_POSITIONS = 2


@register('MODELS', downstream=True)
class ConvMAE(ConvViT):
    """ConvMAE (MCMAE) multi-scale backbone for detection and segmentation.

    Takes (B, C, H, W) with any H, W >= 32 (48 with the ``fpn`` branch) and returns NCHW maps for
    ``out_indices``: 0 at H/4, 1 at H/8, 2 at H/16 and 3, an extra H/32 map made from the H/16 one (strides for
    the paper's patch sizes). The map at stride s <= 16 is ceil(H/s) x ceil(W/s) (inputs are zero-padded to
    multiples of 16 and the outputs cropped back); the H/32 map is ceil(H/32) with max-pooling and
    (ceil(H/16) - 1) // 2 with ``fpn`` (a 512 input gives 15, as officially).

    Args (beyond :class:`ConvViT`'s):
        out_indices: which of the four maps to return.
        frozen_stages: -1 freezes nothing; k in 0..3 freezes every module and parameter of stages 0..k
            (:attr:`ConvViT.STAGE_OF`: 0 is ``patch_embed1``; stage 3 includes ``patch_embed4``,
            ``pos_embed`` and the shared relative position tables; with ``out_type='avg_featmap'`` also
            ``fc_norm``, so that 3 freezes the whole classification backbone, as the linear probe does).
        h32: how the H/32 map is made: ``'maxpool'`` (2x2 max-pooling, official detection backbone) or ``'fpn'``
            (official segmentation backbone: module ``fpn`` = Conv2d(C3, C3, 3, stride 2, no padding) -> norm
            -> GELU; not part of the encoder, so never frozen and in the last layer-decay group).
        fpn_norm_cfg: mmcv norm config of the ``fpn`` branch (the official one is SyncBN).
        out_type: ``'featmaps'`` returns the maps above; ``'avg_featmap'`` (image classification, the official
            fine-tuning and linear-probing head input) returns a 1-tuple ``(B, C3)``: the stage-3 tokens
            averaged, then ``fc_norm`` (LayerNorm, eps 1e-6); ``out_indices`` is then not used.
        arch: a named size or dict (see :class:`ConvViT`), or ``'auto'``: reads ``in_channels``, ``patch_sizes``,
            ``embed_dims``, ``depths``, ``mlp_ratios``, ``conv_kernel_size`` (and ``img_size`` unless given) from
            the shapes of ``init_cfg``'s checkpoint, e.g. the official v2 Small/Base/Large/Huge ones; ``num_heads``
            is taken as given, else 64-channel heads. Any of those fields also given explicitly must agree with the
            checkpoint: one ``ValueError`` lists every difference.
    """

    def __init__(self, *args, out_indices: Sequence[int] = (0, 1, 2), frozen_stages: int = -1,
                 h32: str = 'maxpool', fpn_norm_cfg: Optional[dict] = None, out_type: str = 'featmaps',
                 arch: Union[None, str, dict] = None, **kwargs):
        state = None
        if arch == 'auto':
            kwargs, state = self._arch_from_checkpoint(kwargs)
        elif arch is not None:
            kwargs['arch'] = arch
        super().__init__(*args, **kwargs)
        self._preloaded_state = state  # init_weights loads these weights without reading the file again
        if out_type not in ('featmaps', 'avg_featmap'):
            raise ValueError(f"out_type must be 'featmaps' or 'avg_featmap', got {out_type!r}")
        self.out_type = out_type
        if out_type == 'avg_featmap':
            self.fc_norm = nn.LayerNorm(self.embed_dims[2], eps=1e-6)
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of (0, 1, 2, 3), got {out_indices}')
        if h32 not in ('maxpool', 'fpn'):
            raise ValueError(f"h32 must be 'maxpool' or 'fpn', got {h32!r}")
        if h32 == 'fpn':
            if 3 not in out_indices:
                raise ValueError(f"h32='fpn' builds a branch for the H/32 map only; out_indices {out_indices} "
                                 'do not include 3')
            from mmcv.cnn import build_norm_layer
            dim = self.embed_dims[2]
            self.fpn = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, stride=2),
                                     build_norm_layer(fpn_norm_cfg or dict(type='BN'), dim)[1],
                                     nn.GELU())
        elif fpn_norm_cfg is not None:
            raise ValueError("fpn_norm_cfg is only used with h32='fpn'")
        self.h32 = h32
        if not -1 <= frozen_stages <= 3:
            raise ValueError(f'frozen_stages must be in -1..3, got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self._freeze_stages()

    @staticmethod
    def _arch_from_checkpoint(kwargs: dict) -> Tuple[dict, Dict[str, Tensor]]:
        """``kwargs`` completed with the architecture of ``init_cfg``'s checkpoint (``arch='auto'``), and the
        encoder weights read from it."""
        pretrained, _ = split_init_cfg(kwargs.get('init_cfg'))
        if len(pretrained) != 1:
            raise ValueError(f"arch='auto' reads the architecture from one init_cfg entry dict(type='Pretrained', "
                             f"checkpoint=...), got init_cfg={kwargs.get('init_cfg')!r}")
        state = pretrained_state(pretrained[0])
        inferred = infer_arch(state, kwargs.get('num_heads'))
        check_weights_fill(parameter_floor(inferred), state, pretrained[0]['checkpoint'],
                           f'the encoder its shapes claim ({", ".join(f"{k}={v}" for k, v in inferred.items())})')
        check_arch(kwargs, inferred, pretrained[0]['checkpoint'])
        return {**inferred, **kwargs}, state

    def init_weights(self) -> None:
        super().init_weights()
        self._freeze_stages()

    def _is_frozen(self, name: str) -> bool:
        stage = self.stage_of(name)
        if stage is None:
            return name.split('.', 1)[0] == 'fc_norm' and self.frozen_stages >= 3
        return stage <= self.frozen_stages

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        for name, module in self.named_children():
            if self._is_frozen(name):
                module.eval()
        for name, param in self.named_parameters():
            if self._is_frozen(name):
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    @property
    def min_side(self) -> int:
        """The least H and W in pixels: :data:`MIN_POSITIONS` H/16 positions, one more with the ``fpn`` branch
        (a 3x3 convolution of them)."""
        return (MIN_POSITIONS + (self.h32 == 'fpn')) * self.patch_size

    def _check_input(self, x: Tensor) -> Tensor:
        """``x`` itself, or a ``ValueError`` naming what is wrong with its shape (also in a ``torch.fx`` graph)."""
        return check_images(x, self.in_channels, self.min_side)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """(B, C, H, W) -> the maps of ``out_indices`` (NCHW), or ``((B, C3),)`` with ``out_type='avg_featmap'``."""
        x = self._check_input(x)
        h, w = x.shape[2], x.shape[3]
        maps = list(self.forward_features(self.pad_to_patch(x)))
        if self.out_type == 'avg_featmap':
            s3 = maps[2][:, :, :-(-h // self.patch_size), :-(-w // self.patch_size)]
            return (self.fc_norm(s3.mean(dim=(2, 3))),)
        if 3 in self.out_indices:
            maps.append(self.fpn(maps[2]) if self.h32 == 'fpn'
                        else F.max_pool2d(maps[2], kernel_size=2, stride=2, ceil_mode=True))
        return crop_maps(tuple(maps[i] for i in self.out_indices), self.out_strides, (h, w))

    @property
    def out_strides(self) -> Tuple[int, ...]:
        """Pixels per position of each returned map (``out_indices`` order; 32 for the H/32 map)."""
        strides = (*self.strides, 2 * self.patch_size)
        return tuple(strides[i] for i in self.out_indices)


@torch.fx.wrap  # a leaf of torch.fx graphs (it reads the shape), kept in them since its output is used
def check_images(x: Tensor, channels: int, least: int) -> Tensor:
    """``x`` if it is a batch of images (B, ``channels``, H, W) with H, W >= ``least``, else a ``ValueError``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f'ConvMAE expects images of shape (B, {channels}, H, W), got {tuple(x.shape)}')
    if min(x.shape[2:]) < least:
        raise ValueError(f'ConvMAE expects H and W of at least {least} pixels, got {tuple(x.shape[2:])}')
    return x


def crop_maps(maps: Sequence[Tensor], strides: Sequence[int], hw: Tuple[int, int]) -> Tuple[Tensor, ...]:
    """Crop NCHW maps computed on a zero-padded image to what an (h, w) image covers: ceil(h/s) x ceil(w/s) at
    stride s (no-op for a map already that small, e.g. the ``fpn`` H/32 map). Ceil is ``(h + s - 1) // s``: the
    ``-(-h // s)`` idiom exports to ONNX as a truncating division, which floors."""
    h, w = hw
    return tuple(m[:, :, :(h + s - 1) // s, :(w + s - 1) // s] for m, s in zip(maps, strides))
