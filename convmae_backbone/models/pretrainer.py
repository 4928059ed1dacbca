"""``ConvMAEPretrainer``: masked-autoencoder pretraining of the ConvMAE encoder."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModel
from torch import Tensor, nn

from .convvit import ConvViT
from .layers import TransformerBlock, VisibleGrid, conv_as_linear
from .utils import (PATCH, gather_tokens, get_2d_sincos_pos_embed, patchify, random_mask, upsample_mask,
                    visible_indices)


class ConvMAEPretrainer(ConvViT, BaseModel):
    """ConvMAE pretraining: block-wise masking, masked convolution in stages 1-2, stage 3 on visible tokens,
    multi-scale fusion and an MAE decoder that reconstructs the masked 16x16 patches.

    With ``sparse=True`` (default) stages 1-2 run on the visible positions only (see
    :meth:`forward_encoder_sparse`); ``sparse=False`` computes them densely over the whole masked image, as the
    official code does. Both give the same results; the sparse path needs about a quarter of the stage-1/2 work.

    ``state_dict()`` keys equal the official ``MaskedAutoencoderConvViT`` ones. Works for any H, W that are
    multiples of 16: the fixed sin-cos position embeddings are built for the actual grid.
    """

    def __init__(self,
                 img_size: int = 224,
                 in_channels: int = 3,
                 embed_dims: Sequence[int] = (256, 384, 768),
                 depths: Sequence[int] = (2, 2, 11),
                 num_heads: int = 12,
                 mlp_ratios: Union[float, Sequence[float]] = (4, 4, 4),
                 drop_path_rate: float = 0.0,
                 decoder_embed_dim: int = 512,
                 decoder_depth: int = 8,
                 decoder_num_heads: int = 16,
                 mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True,
                 loss_type: str = 'mse',
                 with_cp: bool = False,
                 sparse: bool = True,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(img_size=img_size, in_channels=in_channels, embed_dims=embed_dims, depths=depths,
                         num_heads=num_heads, mlp_ratios=mlp_ratios, drop_path_rate=drop_path_rate,
                         with_cp=with_cp, init_cfg=init_cfg, data_preprocessor=data_preprocessor)
        if loss_type not in ('mse', 'l1'):
            raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        dims = self.embed_dims
        self.mask_ratio, self.norm_pix_loss, self.loss_type = mask_ratio, norm_pix_loss, loss_type
        self.sparse = sparse
        self.in_channels = in_channels
        self.pos_embed.requires_grad = False  # fixed sin-cos
        self.stage1_output_decode = nn.Conv2d(dims[0], dims[2], 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(dims[1], dims[2], 2, stride=2)
        self.norm = nn.LayerNorm(dims[2], eps=1e-6)

        self.decoder_embed = nn.Linear(dims[2], decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.pos_embed.shape[1], decoder_embed_dim),
                                              requires_grad=False)
        decoder_mlp_ratio = float(mlp_ratios if isinstance(mlp_ratios, (int, float)) else mlp_ratios[0])
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, PATCH * PATCH * in_channels)
        self.init_weights()

    def init_weights(self) -> None:
        cfg = self.init_cfg or {}
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from ..checkpoint import load_encoder_weights
            load_encoder_weights(self, cfg['checkpoint'])
            self._is_init = True
            return
        self._init_encoder_weights()
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.pos_grid))
            self.decoder_pos_embed.copy_(get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.pos_grid))
        for proj in (self.patch_embed1.proj, self.patch_embed2.proj, self.patch_embed3.proj):
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        self._is_init = True

    # ------------------------------------------------------------------ helpers
    def _fixed_pos(self, param: Tensor, hw: Tuple[int, int]) -> Tensor:
        """The stored sin-cos embedding for the pretraining grid, a freshly built one for any other grid."""
        if tuple(hw) == self.pos_grid:
            return param
        return get_2d_sincos_pos_embed(param.shape[-1], hw).to(param)

    def _check_input(self, imgs: Tensor, mask: Optional[Tensor]) -> Tuple[int, int]:
        if imgs.dim() != 4 or imgs.shape[1] != self.in_channels:
            raise ValueError(f'expected images of shape (B, {self.in_channels}, H, W), got {tuple(imgs.shape)}')
        h, w = imgs.shape[2:]
        if h % PATCH or w % PATCH or h == 0 or w == 0:
            raise ValueError(f'image height and width must be positive multiples of {PATCH}, got {h}x{w}')
        hw = (h // PATCH, w // PATCH)
        if mask is not None:
            num_tokens = hw[0] * hw[1]
            if mask.shape != (imgs.shape[0], num_tokens):
                raise ValueError(f'mask must have shape (B, L) = ({imgs.shape[0]}, {num_tokens}) for '
                                 f'{h}x{w} images, got {tuple(mask.shape)}')
            visible = (~mask.bool()).sum(dim=1)
            if (visible != visible[0]).any() or visible[0] == 0:
                raise ValueError(f'every image needs the same, non-zero number of visible tokens; got '
                                 f'{visible.tolist()}')
        return hw

    # ------------------------------------------------------------------ model
    def forward_encoder(self, imgs: Tensor, mask: Tensor, hw: Tuple[int, int]) -> Tensor:
        """imgs (B, 3, H, W), mask (B, L) bool (True = masked) -> latent of visible tokens (B, Lv, C3).

        Dispatches to :meth:`forward_encoder_sparse` or :meth:`forward_encoder_dense` following ``self.sparse``.
        """
        if self.sparse:
            return self.forward_encoder_sparse(imgs, mask, hw)
        return self.forward_encoder_dense(imgs, mask, hw)

    def forward_encoder_dense(self, imgs: Tensor, mask: Tensor, hw: Tuple[int, int]) -> Tensor:
        """Reference path: stages 1-2 over the full maps with masked convolution, then gather visible tokens."""
        ids_keep, _ = visible_indices(mask)
        visible = (~mask).to(imgs.dtype)
        s1 = self.conv_stage(1, imgs, upsample_mask(visible, hw, 4))
        s2 = self.conv_stage(2, s1, upsample_mask(visible, hw, 2))
        fuse1 = self.stage1_output_decode(s1).flatten(2).transpose(1, 2)
        fuse2 = self.stage2_output_decode(s2).flatten(2).transpose(1, 2)
        tokens, _ = self.stage3_tokens(s2, self._fixed_pos(self.pos_embed, hw))
        x = self.transformer_stage(gather_tokens(tokens, ids_keep))
        x = x + gather_tokens(fuse1, ids_keep) + gather_tokens(fuse2, ids_keep)
        return self.norm(x)

    def forward_encoder_sparse(self, imgs: Tensor, mask: Tensor, hw: Tuple[int, int]) -> Tensor:
        """Stages 1-2 on visible positions only, same result as :meth:`forward_encoder_dense`.

        The mask is block-wise, so the visible H/4 (H/8) positions are whole 4x4 (2x2) blocks under each visible
        H/16 token; features are kept as (B, Lv, S, S, C) and every stride-k conv is a reshape and a matmul.
        """
        ids_keep, _ = visible_indices(mask)
        grid = VisibleGrid(ids_keep, hw)
        b = imgs.shape[0]
        pixels = grid.gather(imgs.permute(0, 2, 3, 1), PATCH)           # (B, Lv, 16, 16, 3)
        s1 = self.conv_stage_sparse(1, pixels, grid)                     # (B, Lv, 4, 4, C1)
        s2 = self.conv_stage_sparse(2, s1, grid)                         # (B, Lv, 2, 2, C2)
        fuse1 = conv_as_linear(self.stage1_output_decode, s1).flatten(1, 3)  # (B, Lv, C3)
        fuse2 = conv_as_linear(self.stage2_output_decode, s2).flatten(1, 3)
        tokens = self.patch_embed4(self.patch_embed3.forward_blocks(s2).flatten(1, 3))
        pos = self._fixed_pos(self.pos_embed, hw).to(tokens.dtype).expand(b, -1, -1)
        x = self.transformer_stage(tokens + gather_tokens(pos, ids_keep))
        x = x + fuse1 + fuse2
        return self.norm(x)

    def forward_decoder(self, latent: Tensor, mask: Tensor, hw: Tuple[int, int]) -> Tensor:
        """latent (B, Lv, C3) -> prediction for every block (B, L, 16*16*3)."""
        _, ids_restore = visible_indices(mask)
        x = self.decoder_embed(latent)
        b, lv, c = x.shape
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, mask.shape[1] - lv, c)], dim=1)
        x = gather_tokens(x, ids_restore) + self._fixed_pos(self.decoder_pos_embed, hw).to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def reconstruction_target(self, imgs: Tensor) -> Tensor:
        """Patchified images (B, L, 768), per-patch normalised when ``norm_pix_loss``."""
        target = patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked blocks of the per-block MSE (or L1) between ``pred`` and the target."""
        diff = pred - self.reconstruction_target(imgs)
        per_block = (diff ** 2 if self.loss_type == 'mse' else diff.abs()).mean(dim=-1)
        m = mask.to(per_block.dtype)
        return (per_block * m).sum() / m.sum()

    def forward_mae(self, imgs: Tensor, mask: Optional[Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """imgs (B, 3, H, W), H and W multiples of 16; mask (B, L) bool, True = masked, or None to draw one.

        Returns (loss, pred (B, L, 16*16*3), mask (B, L) bool).
        """
        hw = self._check_input(imgs, mask)
        if mask is None:
            mask = random_mask(imgs.shape[0], hw[0] * hw[1], self.mask_ratio, imgs.device, generator)
        mask = mask.to(imgs.device).bool()
        latent = self.forward_encoder(imgs, mask, hw)
        pred = self.forward_decoder(latent, mask, hw)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward(self, inputs: Tensor, data_samples: Optional[List] = None,
                mode: str = 'tensor') -> Union[Dict[str, Tensor], Tensor, List]:
        """mmengine entry point: ``loss`` -> dict(loss=...), ``tensor``/``predict`` -> (pred, mask)."""
        loss, pred, mask = self.forward_mae(inputs)
        if mode == 'loss':
            return dict(loss=loss)
        if mode in ('tensor', 'predict'):
            return pred, mask
        raise ValueError(f"mode must be 'loss', 'tensor' or 'predict', got {mode!r}")
