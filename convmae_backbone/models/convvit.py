"""ConvViT: the ConvMAE encoder, one definition shared by the ``ConvMAE`` backbone and the pretrainer."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from timm.layers import trunc_normal_
from torch import Tensor, nn

from .layers import ConvBlock, PatchEmbed, TransformerBlock, VisibleGrid
from .utils import PATCH, resize_pos_embed

PATCH_SIZES = (4, 2, 2)


def _to_tuple3(value: Union[float, Sequence[float]], name: str) -> Tuple:
    if isinstance(value, (int, float)):
        return (value,) * 3
    if len(value) != 3:
        raise ValueError(f'{name} needs 3 values (one per stage), got {value!r}')
    return tuple(value)


class ConvViT(BaseModule):
    """Multi-scale hybrid convolution-transformer encoder of ConvMAE.

    Stage 1 and 2 are :class:`ConvBlock` stacks at H/4 and H/8, stage 3 is :class:`TransformerBlock` s at H/16
    with an absolute position embedding learnt (or fixed) on the ``img_size // 16`` grid. Parameter names are
    the official ones: ``patch_embed1..4``, ``pos_embed``, ``blocks1..3``.

    Args:
        img_size: image size the position embedding grid corresponds to (int or (h, w)).
        embed_dims: channels of stages 1-3.
        depths: blocks per stage.
        num_heads: attention heads in stage 3.
        mlp_ratios: MLP hidden ratio per stage (a float applies to all).
        drop_path_rate: stochastic depth, rising linearly over all blocks of all stages.
        window_size: 0 for global attention; otherwise stage-3 blocks attend inside windows of this many tokens
            except the blocks in ``global_attn_indexes``.
        use_rel_pos_bias: decomposed relative position bias in stage-3 attention.
        layer_scale_init_value: > 0 adds per-channel layer scale (``gamma_1``/``gamma_2``) to stage-3 blocks.
        with_cp: activation checkpointing of every block while training.
    """

    def __init__(self,
                 img_size: Union[int, Tuple[int, int]] = 224,
                 in_channels: int = 3,
                 embed_dims: Sequence[int] = (256, 384, 768),
                 depths: Sequence[int] = (2, 2, 11),
                 num_heads: int = 12,
                 mlp_ratios: Union[float, Sequence[float]] = (4, 4, 4),
                 drop_path_rate: float = 0.0,
                 window_size: int = 0,
                 global_attn_indexes: Sequence[int] = (),
                 use_rel_pos_bias: bool = False,
                 layer_scale_init_value: float = 0.0,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None,
                 **base_kwargs):
        super().__init__(init_cfg=init_cfg, **base_kwargs)
        embed_dims = tuple(int(d) for d in _to_tuple3(embed_dims, 'embed_dims'))
        depths = tuple(int(d) for d in _to_tuple3(depths, 'depths'))
        mlp_ratios = _to_tuple3(mlp_ratios, 'mlp_ratios')
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % PATCH or img_size[1] % PATCH:
            raise ValueError(f'img_size must be a multiple of {PATCH}, got {img_size}')
        bad = [i for i in global_attn_indexes if not 0 <= i < depths[2]]
        if bad:
            raise ValueError(f'global_attn_indexes {bad} out of range for {depths[2]} stage-3 blocks')
        self.embed_dims, self.depths, self.with_cp = embed_dims, depths, with_cp
        self.pos_grid = (img_size[0] // PATCH, img_size[1] // PATCH)

        self.patch_embed1 = PatchEmbed(in_channels, embed_dims[0], PATCH_SIZES[0])
        self.patch_embed2 = PatchEmbed(embed_dims[0], embed_dims[1], PATCH_SIZES[1])
        self.patch_embed3 = PatchEmbed(embed_dims[1], embed_dims[2], PATCH_SIZES[2])
        self.patch_embed4 = nn.Linear(embed_dims[2], embed_dims[2])
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dims[2]))

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks1 = nn.ModuleList(
            ConvBlock(embed_dims[0], mlp_ratios[0], dpr[i]) for i in range(depths[0]))
        self.blocks2 = nn.ModuleList(
            ConvBlock(embed_dims[1], mlp_ratios[1], dpr[depths[0] + i]) for i in range(depths[1]))
        self.blocks3 = nn.ModuleList(
            TransformerBlock(embed_dims[2], num_heads, mlp_ratios[2], dpr[depths[0] + depths[1] + i],
                             window_size=0 if i in global_attn_indexes else window_size,
                             use_rel_pos=use_rel_pos_bias, rel_pos_size=self.pos_grid,
                             layer_scale_init_value=layer_scale_init_value)
            for i in range(depths[2]))

    def _init_encoder_weights(self) -> None:
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

    def _block(self, blk, x: Tensor, *args) -> Tensor:
        """Run ``blk(x, *args)`` (a module or a bound method), checkpointed when ``with_cp`` and training."""
        if self.with_cp and self.training and x.requires_grad:
            return cp.checkpoint(blk, x, *args, use_reentrant=False)
        return blk(x, *args)

    def conv_stage(self, stage: int, x: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        """Patch embedding + conv blocks of stage 1 or 2: (B, C_prev, H, W) -> (B, C, H/s, W/s)."""
        x = (self.patch_embed1 if stage == 1 else self.patch_embed2)(x)
        for blk in (self.blocks1 if stage == 1 else self.blocks2):
            x = self._block(blk, x, visible)
        return x

    def conv_stage_sparse(self, stage: int, x: Tensor, grid: VisibleGrid) -> Tensor:
        """Stage 1 or 2 on the visible positions of a block-wise mask (see :class:`VisibleGrid`).

        Stage 1: visible 16x16 pixel patches (B, Lv, 16, 16, C_in) -> (B, Lv, 4, 4, C1);
        stage 2: (B, Lv, 4, 4, C1) -> (B, Lv, 2, 2, C2). Equals :meth:`conv_stage` with the mask, at those positions.
        """
        x = (self.patch_embed1 if stage == 1 else self.patch_embed2).forward_blocks(x)
        for blk in (self.blocks1 if stage == 1 else self.blocks2):
            x = self._block(blk.forward_sparse, x, grid)
        return x

    def stage3_tokens(self, x: Tensor, pos_embed: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[int, int]]:
        """Stage-2 map (B, C2, H/8, W/8) -> stage-3 input tokens (B, L, C3) with position embedding, and the grid.

        Without ``pos_embed`` the learnt one is resized (bicubic) from the pretraining grid to the input grid.
        """
        x = self.patch_embed3(x)
        hw = (x.shape[2], x.shape[3])
        x = self.patch_embed4(x.flatten(2).transpose(1, 2))
        if pos_embed is None:
            pos_embed = resize_pos_embed(self.pos_embed, self.pos_grid, hw)
        return x + pos_embed.to(x.dtype), hw

    def transformer_stage(self, x: Tensor, hw: Optional[Tuple[int, int]] = None) -> Tensor:
        """Stage-3 blocks over tokens (B, N, C3); ``hw`` when the tokens form a full grid."""
        for blk in self.blocks3:
            x = self._block(blk, x, hw)
        return x

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Unmasked encoder on (B, 3, H, W), H and W multiples of 16 -> maps at H/4, H/8, H/16 (NCHW).

        Stage 3 is returned after its last block, without the pretraining ``norm``.
        """
        s1 = self.conv_stage(1, x)
        s2 = self.conv_stage(2, s1)
        tokens, hw = self.stage3_tokens(s2)
        tokens = self.transformer_stage(tokens, hw)
        s3 = tokens.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])
        return s1, s2, s3

    @staticmethod
    def pad_to_patch(x: Tensor) -> Tensor:
        """Zero-pad (B, C, H, W) at the bottom/right to multiples of 16."""
        pad_h, pad_w = (-x.shape[2]) % PATCH, (-x.shape[3]) % PATCH
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
