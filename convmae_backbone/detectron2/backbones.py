"""The ConvMAE encoder as the two official detectron2 backbones: ``ConvViT`` (ViTDet-style, under detectron2's
``SimpleFeaturePyramid``) and ``ConvViTDet`` (multi-scale bottom-up under detectron2's ``FPN``).

Both are :class:`convmae_backbone.models.ConvMAE` (the one encoder: same modules, same parameter names as the
official classes, so released detector checkpoints load unchanged) taking the official constructor arguments and
answering detectron2's :class:`~detectron2.modeling.Backbone` interface (a dict of named maps, ``output_shape()``,
``size_divisibility``, ``padding_constraints``). Registered in ``BACKBONE_REGISTRY`` with builders for yacs
configs (:func:`build_convmae_vitdet_backbone`, :func:`build_convmae_fpn_backbone`, settings of
:func:`add_convmae_config`).
"""
import logging
import re
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Union

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid
from detectron2.structures import ImageList
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ..models.backbone import ConvMAE
from ..models.weights import load_pretrained

logger = logging.getLogger(__name__)

#: ConvMAE-Base, the sizes both official detectors use (the official ``ConvViTDet`` hard-codes them).
BASE = dict(patch_size=(4, 2, 2), embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12)
#: The global (not windowed) stage-3 blocks of the official ``ConvViTDet`` (hard-coded in its forward).
DET_GLOBAL_BLOCKS = (0, 3, 6, 10)


def _norm_eps(norm_layer: Callable[[int], nn.Module]) -> float:
    """The eps of an ``nn.LayerNorm`` factory (e.g. ``partial(nn.LayerNorm, eps=1e-6)``)."""
    norm = norm_layer(1)
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f'norm_layer must make nn.LayerNorm layers (the official ones), got {type(norm).__name__}')
    return norm.eps


class _D2Backbone(ConvMAE, Backbone):
    """detectron2's face of :class:`ConvMAE`: named outputs and their shapes, input padding constraints."""

    #: Output names, in the order of ConvMAE's ``out_indices``.
    OUT_NAMES: Sequence[str] = ()

    def _declare(self, names: Sequence[str], size_divisibility: int) -> None:
        self._out_features = list(names)
        channels = (*self.embed_dims, self.embed_dims[2])
        self._out_feature_channels = {n: channels[i] for n, i in zip(names, self.out_indices)}
        self._out_feature_strides = dict(zip(names, self.out_strides))
        self._size_divisibility = size_divisibility

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to multiples of this (the encoder pads to its patch size itself, so this only makes
        detectron2's padding agree with it)."""
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {'size_divisibility': self._size_divisibility}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}

    def forward(self, x: Union[Tensor, ImageList]) -> Dict[str, Tensor]:  # type: ignore[override]
        """(B, 3, H, W) images, or an ImageList of them (the official DET meta-architecture passes one) -> the
        named NCHW maps of :meth:`output_shape`."""
        if isinstance(x, ImageList):
            x = x.tensor
        return dict(zip(self._out_features, super().forward(x)))


class ConvViT(_D2Backbone):
    """The ViTDet-style backbone of OpenGVLab/Official-ConvMAE-Det (``projects/ConvMAEDet/modeling/convmae.py``,
    ``ConvViT``): the H/16 map after the last stage-3 block as ``out_feature`` (B, C3, H/16, W/16), for detectron2's
    ``SimpleFeaturePyramid``. Windowed blocks pad their normalised tokens with zeros that every token attends to,
    decomposed relative position tables per block (global ones for the ``img_size // 16`` grid), the
    ``pretrain_img_size // 16`` position table resized bicubically to the input's grid at every forward and
    trained; conv-block LayerNorms from ``norm_layer`` (patch embeddings: eps 1e-5), as officially.

    Takes the official constructor arguments. Deliberate differences: any input size (not only multiples of 16);
    ``use_act_checkpoint`` is torch's non-reentrant checkpointing (officially fairscale's wrapper);
    ``pretrain_use_cls_token`` defaults to False (the value of the official config; ConvMAE has no class token, so
    True is refused), ``use_abs_pos=False``, ``qkv_bias=False`` and activations other than GELU are refused.
    """

    def __init__(self, img_size: int = 1024, patch_size: Sequence[int] = BASE['patch_size'], in_chans: int = 3,
                 embed_dim: Sequence[int] = BASE['embed_dim'], depth: Sequence[int] = BASE['depth'],
                 num_heads: int = BASE['num_heads'], mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 act_layer: type = nn.GELU, use_abs_pos: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, window_size: int = 0, window_block_indexes: Sequence[int] = (),
                 use_act_checkpoint: bool = False, pretrain_img_size: int = 224, pretrain_use_cls_token: bool = False,
                 out_feature: str = 'last_feat'):
        if pretrain_use_cls_token:
            raise ValueError('pretrain_use_cls_token=True: ConvMAE pretraining has no class token (the official '
                             'config sets False)')
        if not use_abs_pos or not qkv_bias or act_layer is not nn.GELU:
            raise ValueError('ConvMAE ConvViT supports the official use_abs_pos=True, qkv_bias=True and '
                             f'act_layer=nn.GELU only, got {use_abs_pos}, {qkv_bias}, {act_layer}')
        eps = _norm_eps(norm_layer)
        windowed = set(window_block_indexes) if window_size else set()
        super().__init__(
            img_size=img_size, in_channels=in_chans, patch_sizes=tuple(patch_size), embed_dims=tuple(embed_dim),
            depths=tuple(depth), num_heads=num_heads, mlp_ratios=mlp_ratio, drop_path_rate=drop_path_rate,
            window_size=window_size, global_attn_indexes=[i for i in range(depth[2]) if i not in windowed],
            rel_pos_bias='decomposed' if use_rel_pos else 'none', norm_eps=eps, conv_norm_eps=eps,
            pos_embed_grid=pretrain_img_size // 16, window_padding='zeros', with_cp=use_act_checkpoint,
            out_indices=(2,))
        self.init_random_weights()
        if not rel_pos_zero_init:
            for name, p in self.named_parameters():
                if name.endswith(('rel_pos_h', 'rel_pos_w')):
                    trunc_normal_(p, std=0.02)
        self._declare([out_feature], size_divisibility=self.patch_size)


class ConvViTDet(_D2Backbone):
    """The bottom-up of Alpha-VL/ConvMAE's detector (``DET/models/convmae.py``, ``ConvViTDet``): maps ``s0``-``s3``
    at strides 4, 8, 16, 32 (channels C1, C2, C3, C3; ``s3`` by 2x2 max-pooling of ``s2``) for detectron2's
    ``FPN``. Stage 3 attends in ``window_size`` windows except blocks ``global_attn_indexes`` (officially 0, 3, 6,
    10), with BEiT relative position tables shared by all windowed blocks (``windowed_rel_pos_bias``) and all
    global ones (``global_rel_pos_bias``); the position table is for the ``img_size // 16`` grid.

    Takes the official constructor arguments. The official class ignores its size arguments and builds
    ConvMAE-Base (its config passes ViT-B values: ``patch_size=16``, ``embed_dim=768``, ``depth=12``): a single
    number for them is ignored likewise (logged), three numbers (one per stage) set the sizes. ``pretrained``
    loads a ConvMAE checkpoint through the safe loader (resizing the position table); ``sincos_pos_embed=True``
    freezes the position table (officially it only does that); ``zero_pos_embed`` starts it at zero.
    Deliberate differences: any input size (officially 1024x1024 only; windows that overhang the grid are masked
    padding); ``stop_grad_conv1`` freezes the first patch embedding's convolution (officially an AttributeError);
    ``init_values``, ``beit_qkv_bias`` and ``qkv_bias`` are accepted and unused, as officially.
    """

    def __init__(self, window_size: int, with_cp: bool = False, pretrained: str = '', stop_grad_conv1: bool = False,
                 sincos_pos_embed: bool = False, zero_pos_embed: bool = False, img_size: int = 1024,
                 patch_size: Union[int, Sequence[int]] = BASE['patch_size'], in_chans: int = 3,
                 embed_dim: Union[int, Sequence[int]] = BASE['embed_dim'],
                 depth: Union[int, Sequence[int]] = BASE['depth'], num_heads: int = BASE['num_heads'],
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 global_attn_indexes: Sequence[int] = DET_GLOBAL_BLOCKS, init_values: Optional[float] = None,
                 beit_qkv_bias: bool = False, qkv_bias: bool = True, **unused: object):
        sizes = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth)
        for key, value in sizes.items():
            if isinstance(value, int):
                logger.info('ConvViTDet: %s=%s ignored (ConvMAE-Base %s), as by the official class', key, value,
                            BASE[key])
                sizes[key] = BASE[key]
        if unused:
            logger.info('ConvViTDet: arguments unused, as by the official class: %s', sorted(unused))
        super().__init__(
            img_size=img_size, in_channels=in_chans, patch_sizes=tuple(sizes['patch_size']),
            embed_dims=tuple(sizes['embed_dim']), depths=tuple(sizes['depth']), num_heads=num_heads,
            mlp_ratios=mlp_ratio, drop_path_rate=drop_path_rate, window_size=window_size,
            global_attn_indexes=global_attn_indexes, rel_pos_bias='shared', norm_eps=1e-6,
            freeze_pos_embed=sincos_pos_embed, h32='maxpool', with_cp=with_cp, out_indices=(0, 1, 2, 3))
        self.init_random_weights()
        if pretrained:
            load_pretrained(self, pretrained)
        if zero_pos_embed:
            nn.init.zeros_(self.pos_embed)
        if stop_grad_conv1:
            self.patch_embed1.proj.requires_grad_(False)
        self._declare(['s0', 's1', 's2', 's3'], size_divisibility=2 * self.patch_size)


def get_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    """lr multiplier of the detector parameter ``name`` under layer-wise decay, the rule of the official
    ViTDet-style ConvMAE (``lr_factor_func`` of detectron2's ``get_default_optimizer_params``): the patch
    embeddings and conv stages of the backbone are layer 0, its ``blocks3.i`` layer i + 1, everything else
    (``pos_embed`` included) layer ``num_layers + 1``; the multiplier is ``lr_decay_rate ** (num_layers + 1 -
    layer)``."""
    layer = num_layers + 1
    if name.startswith('backbone'):
        match = re.search(r'\.blocks3\.(\d+)\.', name)
        if '.patch_embed' in name or '.blocks1.' in name or '.blocks2.' in name:
            layer = 0
        elif match:
            layer = int(match.group(1)) + 1
    return lr_decay_rate ** (num_layers + 1 - layer)


# ----------------------------------------------------------------------------------------------- yacs configs
def add_convmae_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.CONVMAE`` (the encoder's settings, official ConvMAE-Base defaults) and
    ``MODEL.CONVMAE_PYRAMID`` (the simple feature pyramid's) to a yacs config; returns it."""
    cfg.MODEL.CONVMAE = CfgNode(dict(
        IMG_SIZE=1024, PATCH_SIZE=list(BASE['patch_size']), EMBED_DIM=list(BASE['embed_dim']),
        DEPTH=list(BASE['depth']), NUM_HEADS=BASE['num_heads'], MLP_RATIO=4.0, DROP_PATH_RATE=0.1,
        NORM_EPS=1e-6, WINDOW_SIZE=14, WINDOW_BLOCK_INDEXES=[0, 2, 3, 5, 6, 8, 9], USE_REL_POS=True,
        PRETRAIN_IMG_SIZE=224, GLOBAL_ATTN_INDEXES=list(DET_GLOBAL_BLOCKS), DET_WINDOW_SIZE=16,
        USE_ACT_CHECKPOINT=False))
    cfg.MODEL.CONVMAE_PYRAMID = CfgNode(dict(SCALE_FACTORS=[4.0, 2.0, 1.0, 0.5], SQUARE_PAD=1024))
    return cfg


@BACKBONE_REGISTRY.register()
def build_convmae_vitdet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """``MODEL.BACKBONE.NAME: build_convmae_vitdet_backbone``: :class:`ConvViT` under detectron2's
    ``SimpleFeaturePyramid`` (``MODEL.FPN.OUT_CHANNELS``, ``MODEL.FPN.NORM``, p2-p6), as the official config."""
    c = cfg.MODEL.CONVMAE
    net = ConvViT(img_size=c.IMG_SIZE, patch_size=c.PATCH_SIZE, in_chans=input_shape.channels,
                  embed_dim=c.EMBED_DIM, depth=c.DEPTH, num_heads=c.NUM_HEADS, mlp_ratio=c.MLP_RATIO,
                  drop_path_rate=c.DROP_PATH_RATE, norm_layer=partial(nn.LayerNorm, eps=c.NORM_EPS),
                  window_size=c.WINDOW_SIZE, window_block_indexes=c.WINDOW_BLOCK_INDEXES, use_rel_pos=c.USE_REL_POS,
                  use_act_checkpoint=c.USE_ACT_CHECKPOINT, pretrain_img_size=c.PRETRAIN_IMG_SIZE)
    return SimpleFeaturePyramid(net=net, in_feature='last_feat', out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
                                scale_factors=tuple(cfg.MODEL.CONVMAE_PYRAMID.SCALE_FACTORS),
                                top_block=LastLevelMaxPool(), norm=cfg.MODEL.FPN.NORM or 'LN',
                                square_pad=cfg.MODEL.CONVMAE_PYRAMID.SQUARE_PAD)


@BACKBONE_REGISTRY.register()
def build_convmae_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """``MODEL.BACKBONE.NAME: build_convmae_fpn_backbone``: :class:`ConvViTDet` under detectron2's ``FPN``
    (``MODEL.FPN.*``, in features s0-s3, p2-p6)."""
    c = cfg.MODEL.CONVMAE
    bottom_up = ConvViTDet(window_size=c.DET_WINDOW_SIZE, with_cp=c.USE_ACT_CHECKPOINT, img_size=c.IMG_SIZE,
                           patch_size=c.PATCH_SIZE, in_chans=input_shape.channels, embed_dim=c.EMBED_DIM,
                           depth=c.DEPTH, num_heads=c.NUM_HEADS, mlp_ratio=c.MLP_RATIO,
                           drop_path_rate=c.DROP_PATH_RATE, global_attn_indexes=c.GLOBAL_ATTN_INDEXES)
    return FPN(bottom_up=bottom_up, in_features=['s0', 's1', 's2', 's3'], out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


__all__ = ['ConvViT', 'ConvViTDet', 'get_vit_lr_decay_rate', 'add_convmae_config', 'build_convmae_vitdet_backbone',
           'build_convmae_fpn_backbone']
