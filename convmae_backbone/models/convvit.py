"""ConvViT: the ConvMAE encoder, one definition shared by the ``ConvMAE`` backbone and the pretrainer."""
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule, initialize
from timm.layers import trunc_normal_
from torch import Tensor, nn

from .arch import resolve_arch
from .attention import RelativePositionBias, TransformerBlock
from .conv_blocks import ConvBlock, PatchEmbed
from .masking import BlockMask
from .utils import is_traced, resize_pos_embed
from .weights import MIN_LOADED, load_pretrained, resize_on_load, split_init_cfg

# a leaf of torch.fx graphs: it compares the (symbolic) token grid with the embedding's
torch.fx.wrap('resize_pos_embed')


#: Relative position bias of stage 3 (``rel_pos_bias`` of :class:`ConvViT`).
REL_POS_BIAS = ('none', 'decomposed', 'shared', 'per_block')


def _to_tuple3(value: Union[float, Sequence[float]], name: str) -> Tuple:
    if isinstance(value, (int, float)):
        return (value,) * 3
    if len(value) != 3:
        raise ValueError(f'{name} needs 3 values (one per stage), got {value!r}')
    return tuple(value)


class ConvViT(BaseModule):
    """Multi-scale hybrid convolution-transformer encoder of ConvMAE.

    Stage 1 and 2 are :class:`ConvBlock` stacks at H/4 and H/8, stage 3 is :class:`TransformerBlock` s at H/16
    with an absolute position embedding learnt (or fixed) on the ``img_size // 16`` grid and resized bicubically
    for other grids. Parameter names are the official ones: ``patch_embed1..4``, ``pos_embed``, ``blocks1..3``,
    and for relative position bias ``blocks3.i.attn.rel_pos_h/w`` (decomposed), ``blocks3.i.attn.
    relative_position_bias_table`` (per block), ``windowed_rel_pos_bias.relative_position_bias_table`` and
    ``global_rel_pos_bias.relative_position_bias_table`` (shared). Stage-1/2 features are channels last, dense
    (B, H, W, C) or, in sparse pretraining, the visible blocks (B, Lv, S, S, C) (see :mod:`.masking`).
    The position embedding's grid can also be set apart from ``img_size`` (``pos_embed_grid``).

    Args:
        img_size: image size (int or (h, w)) whose ``img_size // 16`` grid the position embedding (unless
            ``pos_embed_grid``) and the relative position tables of global blocks are built for.
        arch: a named size (:data:`~.arch.ARCH_SETTINGS`: ``'base'``/``'b'``, ``'demo'``) or a dict of
            :data:`~.arch.ARCH_FIELDS` giving the five fields below; any of them given explicitly replaces the
            arch's value. None: ConvMAE-Base.
        patch_sizes: strides of the three patch embeddings; a stage-3 token covers their product in pixels.
        embed_dims: channels of stages 1-3.
        depths: blocks per stage.
        num_heads: attention heads in stage 3.
        mlp_ratios: MLP hidden ratio per stage (a float applies to all).
        conv_kernel_size: kernel of the stage-1/2 depthwise convolutions (odd; 5 officially, the paper ablates 7
            and 9); the sparse pretraining path reads a halo of ``conv_kernel_size // 2`` around visible blocks.
        drop_path_rate: stochastic depth, rising linearly over all blocks of all stages.
        window_size: 0 for global attention; otherwise stage-3 blocks attend inside windows of this many tokens
            except the blocks in ``global_attn_indexes``.
        rel_pos_bias: relative position bias of the stage-3 attention: ``'none'``; ``'decomposed'`` (ViTDet,
            per block); ``'shared'`` (official ConvMAE detection: one BEiT table for all windowed blocks, built
            for the window, and one for all global blocks, built for the ``img_size // 16`` grid); ``'per_block'``
            (official ConvMAE segmentation: a BEiT table in every block, built for its window or the grid).
            Tables start at zero and are resized bicubically for other grids (see :mod:`.attention`).
        use_rel_pos_bias: True is the same as ``rel_pos_bias='decomposed'``.
        layer_scale_init_value: > 0 adds per-channel layer scale (``gamma_1``/``gamma_2``) to stage-3 blocks.
        norm_eps: eps of the stage-3 LayerNorms (1e-6 in the official pretraining and detection code, 1e-5 in the
            segmentation code); the patch embeddings always use 1e-5, the conv blocks ``conv_norm_eps``.
        freeze_pos_embed: keep the position embedding fixed (``requires_grad=False``), as the official detection
            backbone does with the pretrained one resized to its grid.
        pos_embed_grid: token grid (int or (h, w)) of the position embedding when it is not that of ``img_size``:
            the official ViTDet-style detector keeps the 14x14 table of its 224 pretraining and resizes it to
            the input's grid at every forward, while ``img_size`` 1024 sizes its global tables.
        window_padding: ``'masked'`` (padding tokens of windows are masked out of attention, so a window
            covering the whole grid is global attention) or ``'zeros'`` (the official ViTDet-style detector:
            the normalised tokens are padded with zeros that every token attends to); see
            :data:`~.attention.WINDOW_PADDING`.
        conv_norm_eps: eps of the conv blocks' LayerNorms (1e-5 officially; 1e-6 in the ViTDet-style detector,
            whose configured norm layer reaches them).
        with_cp: activation checkpointing of every block while training.
        init_cfg: mmengine's: a dict or a list of dicts. ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` loads
            ConvMAE weights of any supported format (:func:`convmae_backbone.models.weights.load_pretrained`,
            read through mmengine's ``CheckpointLoader``), with mmengine's ``prefix`` (only the keys under it,
            stripped) and ``min_loaded`` (default 0.5: fewer of the encoder's tensors filled is an error; 0.0
            accepts any checkpoint with a ConvMAE key). Other entries (e.g. ``Constant``) are applied by mmengine
            after the random initialisation, ``Pretrained`` ones last.

    Weights of another grid or table size are resized whenever they are loaded (``load_state_dict`` pre-hook
    :func:`convmae_backbone.models.weights.resize_on_load`).
    """

    #: Which stage every top-level module or parameter of the encoder belongs to (0: the stem
    #: ``patch_embed1``). The one table behind freezing (``frozen_stages``), layer ids for layer-wise lr decay
    #: and backbone export; names not in it are not part of the encoder.
    STAGE_OF: Dict[str, int] = {
        'patch_embed1': 0, 'blocks1': 1, 'patch_embed2': 2, 'blocks2': 2,
        'patch_embed3': 3, 'patch_embed4': 3, 'pos_embed': 3, 'blocks3': 3,
        'windowed_rel_pos_bias': 3, 'global_rel_pos_bias': 3}
    #: Encoder modules that are no layer of the layer-wise lr decay (they get the id of the rest, as officially).
    SHARED_TABLES = ('windowed_rel_pos_bias', 'global_rel_pos_bias')

    def __init__(self,
                 img_size: Union[int, Tuple[int, int]] = 224,
                 in_channels: int = 3,
                 patch_sizes: Optional[Sequence[int]] = None,
                 embed_dims: Optional[Sequence[int]] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[int] = None,
                 mlp_ratios: Union[None, float, Sequence[float]] = None,
                 arch: Union[None, str, Dict[str, object]] = None,
                 conv_kernel_size: int = 5,
                 drop_path_rate: float = 0.0,
                 window_size: int = 0,
                 global_attn_indexes: Sequence[int] = (),
                 rel_pos_bias: str = 'none',
                 use_rel_pos_bias: bool = False,
                 layer_scale_init_value: float = 0.0,
                 norm_eps: float = 1e-6,
                 freeze_pos_embed: bool = False,
                 pos_embed_grid: Optional[Union[int, Tuple[int, int]]] = None,
                 window_padding: str = 'masked',
                 conv_norm_eps: float = 1e-5,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None,
                 **base_kwargs):
        super().__init__(init_cfg=init_cfg, **base_kwargs)
        split_init_cfg(init_cfg)  # a malformed Pretrained entry fails here, before any weight is built
        #: Encoder weights of init_cfg's checkpoint already read (by ``ConvMAE(arch='auto')``), used once by
        #: :meth:`init_weights` instead of reading the file again.
        self._preloaded_state: Optional[Dict[str, Tensor]] = None
        self.register_load_state_dict_pre_hook(resize_on_load)
        sizes = resolve_arch(arch, dict(patch_sizes=patch_sizes, embed_dims=embed_dims, depths=depths,
                                        num_heads=num_heads, mlp_ratios=mlp_ratios))
        patch_sizes, embed_dims, depths = sizes['patch_sizes'], sizes['embed_dims'], sizes['depths']
        num_heads, mlp_ratios = int(sizes['num_heads']), sizes['mlp_ratios']
        if conv_kernel_size < 1 or conv_kernel_size % 2 == 0:
            raise ValueError(f'conv_kernel_size must be a positive odd number, got {conv_kernel_size}')
        self.conv_kernel_size = int(conv_kernel_size)
        patch_sizes = tuple(int(p) for p in _to_tuple3(patch_sizes, 'patch_sizes'))
        embed_dims = tuple(int(d) for d in _to_tuple3(embed_dims, 'embed_dims'))
        depths = tuple(int(d) for d in _to_tuple3(depths, 'depths'))
        mlp_ratios = _to_tuple3(mlp_ratios, 'mlp_ratios')
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = math.prod(patch_sizes)
        if img_size[0] % self.patch_size or img_size[1] % self.patch_size:
            raise ValueError(f'img_size must be a multiple of {self.patch_size}, got {img_size}')
        bad = [i for i in global_attn_indexes if not 0 <= i < depths[2]]
        if bad:
            raise ValueError(f'global_attn_indexes {bad} out of range for {depths[2]} stage-3 blocks')
        if rel_pos_bias not in REL_POS_BIAS:
            raise ValueError(f'rel_pos_bias must be one of {REL_POS_BIAS}, got {rel_pos_bias!r}')
        if use_rel_pos_bias:
            if rel_pos_bias not in ('none', 'decomposed'):
                raise ValueError(f'use_rel_pos_bias=True means rel_pos_bias=\'decomposed\', which contradicts '
                                 f'rel_pos_bias={rel_pos_bias!r}; set only rel_pos_bias')
            rel_pos_bias = 'decomposed'
        self.rel_pos_bias = rel_pos_bias
        self.patch_sizes, self.embed_dims, self.depths, self.with_cp = patch_sizes, embed_dims, depths, with_cp
        self.mlp_ratios = mlp_ratios
        self.in_channels = in_channels
        #: grid of the global relative position tables; ``pos_grid``: grid of the position embedding
        self.rel_pos_grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        if pos_embed_grid is None:
            self.pos_grid = self.rel_pos_grid
        else:
            self.pos_grid = ((pos_embed_grid, pos_embed_grid) if isinstance(pos_embed_grid, int)
                             else tuple(int(g) for g in pos_embed_grid))

        self.patch_embed1 = PatchEmbed(in_channels, embed_dims[0], patch_sizes[0])
        self.patch_embed2 = PatchEmbed(embed_dims[0], embed_dims[1], patch_sizes[1])
        self.patch_embed3 = PatchEmbed(embed_dims[1], embed_dims[2], patch_sizes[2])
        self.patch_embed4 = nn.Linear(embed_dims[2], embed_dims[2])
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dims[2]),
                                      requires_grad=not freeze_pos_embed)

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks1 = nn.ModuleList(
            ConvBlock(embed_dims[0], mlp_ratios[0], dpr[i], conv_kernel_size, norm_eps=conv_norm_eps)
            for i in range(depths[0]))
        self.blocks2 = nn.ModuleList(
            ConvBlock(embed_dims[1], mlp_ratios[1], dpr[depths[0] + i], conv_kernel_size, norm_eps=conv_norm_eps)
            for i in range(depths[1]))
        windows = [0 if i in global_attn_indexes else window_size for i in range(depths[2])]
        block_rel_pos = dict(none='none', shared='none', decomposed='decomposed', per_block='table')[rel_pos_bias]
        self.blocks3 = nn.ModuleList(
            TransformerBlock(embed_dims[2], num_heads, mlp_ratios[2], dpr[depths[0] + depths[1] + i],
                             window_size=windows[i], rel_pos=block_rel_pos, rel_pos_size=self.rel_pos_grid,
                             layer_scale_init_value=layer_scale_init_value, norm_eps=norm_eps,
                             window_padding=window_padding)
            for i in range(depths[2]))
        if rel_pos_bias == 'shared':
            if any(windows):
                self.windowed_rel_pos_bias = RelativePositionBias((window_size, window_size), num_heads)
            if not all(windows):
                self.global_rel_pos_bias = RelativePositionBias(self.rel_pos_grid, num_heads)

    # ------------------------------------------------------------------------------------ stage membership
    @classmethod
    def stage_of(cls, name: str) -> Optional[int]:
        """The stage (0..3) of an encoder parameter, buffer or module ``name`` (relative to the encoder), or None
        for names outside the encoder (decoder, fusion, heads)."""
        return cls.STAGE_OF.get(name.split('.', 1)[0])

    def get_layer_id(self, name: str) -> int:
        """Layer id for layer-wise lr decay, as in the official code: 0 for the patch embeddings, the position
        embedding and the convolutional stages 1-2; ``i + 1`` for ``blocks3.i``; ``depths[2] + 1`` for anything
        outside the encoder and for the shared relative position tables."""
        stage = self.stage_of(name)
        if stage is None or name.split('.', 1)[0] in self.SHARED_TABLES:
            return self.depths[2] + 1
        match = re.match(r'blocks3\.(\d+)(\.|$)', name)
        return int(match.group(1)) + 1 if match else 0

    # ------------------------------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Initialise at random, apply ``init_cfg``'s other entries (mmengine's ``initialize``), then load the
        checkpoint of each ``Pretrained`` entry."""
        pretrained, others = split_init_cfg(self.init_cfg)
        self.init_random_weights()
        if others:
            initialize(self, others)
        for cfg in pretrained:
            load_pretrained(self, cfg['checkpoint'], cfg.get('prefix'), cfg.get('min_loaded', MIN_LOADED),
                            cfg.get('map_location', 'cpu'), state=self._preloaded_state)
        self._preloaded_state = None
        self._is_init = True

    def init_random_weights(self) -> None:
        """Random initialisation as in the reference: trunc-normal Linear weights, LayerNorm to identity."""
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ forward
    def _block(self, blk: nn.Module, x: Tensor, *args) -> Tensor:
        """Run ``blk(x, *args)``, checkpointed when ``with_cp`` and training."""
        if self.with_cp and self.training and x.requires_grad:
            return cp.checkpoint(blk, x, *args, use_reentrant=False)
        return blk(x, *args)

    def conv_stage(self, stage: int, x: Tensor, mask: Optional[BlockMask] = None) -> Tensor:
        """Patch embedding + conv blocks of stage 1 or 2 on channels-last features of either layout:
        (B, H, W, C_prev) -> (B, H/p, W/p, C), or (B, Lv, S, S, C_prev) -> (B, Lv, S/p, S/p, C)."""
        x = (self.patch_embed1 if stage == 1 else self.patch_embed2)(x)
        for blk in (self.blocks1 if stage == 1 else self.blocks2):
            x = self._block(blk, x, mask)
        return x

    def pos_embed_for(self, grid: Tuple[int, int]) -> Tensor:
        """(1, h*w, C3) position embedding of a token grid: the learnt one, resized bicubically when the grid is
        not the one it was learnt on."""
        return resize_pos_embed(self.pos_embed, self.pos_grid, grid)

    def stage3_tokens(self, s2: Tensor, mask: Optional[BlockMask] = None) -> Tuple[Tensor, Tuple[int, int]]:
        """Stage-2 features -> stage-3 input tokens with position embedding, and the token grid.

        s2 dense (B, H/8, W/8, C2) -> (B, L, C3), or only the visible tokens (B, Lv, C3) when a mask is given;
        sparse (B, Lv, 2, 2, C2) -> (B, Lv, C3).
        """
        x = self.patch_embed3(s2)
        if mask is None:
            grid = (x.shape[1], x.shape[2])
            return self.patch_embed4(x.flatten(1, 2)) + self.pos_embed_for(grid).to(x.dtype), grid
        x = self.patch_embed4(mask.visible_tokens(x))
        return x + mask.keep(self.pos_embed_for(mask.grid).to(x.dtype).expand(x.shape[0], -1, -1)), mask.grid

    def shared_table(self, blk: TransformerBlock) -> Optional[RelativePositionBias]:
        """The shared relative position table of a stage-3 block (``rel_pos_bias='shared'``), else None."""
        if self.rel_pos_bias != 'shared':
            return None
        return self.windowed_rel_pos_bias if blk.window_size else self.global_rel_pos_bias

    def transformer_stage(self, x: Tensor, hw: Optional[Tuple[int, int]] = None) -> Tensor:
        """Stage-3 blocks over tokens (B, N, C3); ``hw`` when the tokens form a full grid."""
        for blk in self.blocks3:
            x = self._block(blk, x, hw, self.shared_table(blk))
        return x

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Unmasked encoder on (B, C, H, W), H and W multiples of ``patch_size`` -> maps at H/4, H/8, H/16
        (NCHW views of channels-last memory).

        Stage 3 is returned after its last block, without the pretraining ``norm``.
        """
        s1, s2, s3 = self.forward_stages(x)
        return s1.permute(0, 3, 1, 2), s2.permute(0, 3, 1, 2), s3.permute(0, 3, 1, 2)

    def forward_stages(self, x: Tensor, num_stages: int = 3) -> List[Tensor]:
        """The first ``num_stages`` stages of the unmasked encoder on (B, C, H, W), H and W multiples of
        ``patch_size`` -> their channels-last maps (B, H/s, W/s, C_i) at s = 4, 8, 16 (later stages do not run)."""
        s1, s2, s3, grid = self.encode(x.permute(0, 2, 3, 1), num_stages=num_stages)
        if s3 is not None:
            s3 = s3.reshape(x.shape[0], grid[0], grid[1], -1)
        return [s1, s2, s3][:num_stages]

    def encode(self, x: Tensor, mask: Optional[BlockMask] = None, num_stages: int = 3
               ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tuple[int, int]]]:
        """The encoder's stages in order (the one place that states it), on channels-last input -> (s1, s2, s3,
        grid): stage-1/2 features, stage-3 tokens after the last block (no pretraining ``norm``) and the token grid
        (h, w). Stages after ``num_stages`` do not run and are returned as None (grid too, before stage 3).

        Without a mask: x (B, H, W, C) -> s1 (B, H/4, W/4, C1), s2 (B, H/8, W/8, C2), s3 (B, h*w, C3). With a
        mask (pretraining): x dense (B, H, W, C) (masked convolution) or the visible blocks (B, Lv, P, P, C)
        (sparse), s1 and s2 in the same layout as x, s3 the visible tokens (B, Lv, C3).
        """
        s1 = self.conv_stage(1, x, mask)
        if num_stages < 2:
            return s1, None, None, None
        s2 = self.conv_stage(2, s1, mask)
        if num_stages < 3:
            return s1, s2, None, None
        tokens, hw = self.stage3_tokens(s2, mask)
        return s1, s2, self.transformer_stage(tokens, hw if mask is None else None), hw

    @property
    def strides(self) -> Tuple[int, int, int]:
        """Pixels per position at the outputs of stages 1, 2 and 3 (4, 8, 16 for the paper's patch sizes)."""
        p = self.patch_sizes
        return p[0], p[0] * p[1], self.patch_size

    def pad_to_patch(self, x: Tensor) -> Tensor:
        """Zero-pad (B, C, H, W) at the bottom/right to multiples of ``patch_size``.

        The padded size is written as ``ceil(H / p) * p`` (not ``H + (-H) % p``), so that for a symbolic H
        (``torch.export``) it is provably a multiple of every stride; when exporting or tracing (``torch.fx``) the
        pad is always applied."""
        p = self.patch_size
        h, w = x.shape[2], x.shape[3]
        hp, wp = (h + p - 1) // p * p, (w + p - 1) // p * p
        if torch.compiler.is_exporting() or is_traced(x) or hp != h or wp != w:
            return F.pad(x, (0, wp - w, 0, hp - h))
        return x
