"""Small pure helpers shared by the encoder, the backbone and the pretrainer."""
from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PATCH = 16  # pixels per side of one stage-3 token (4 * 2 * 2)


def get_2d_sincos_pos_embed(embed_dim: int, grid_hw: Tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (1, h*w, embed_dim), tokens in raster order.

    Follows the MAE convention: the first half of the channels encodes the column index, the second half the
    row index; each half is [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(k / (D/4)).
    Computed in float64 (as the reference does with numpy) and returned as float64.
    """
    if embed_dim % 4:
        raise ValueError(f'sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}')
    return _sincos_cached(embed_dim, tuple(grid_hw)).clone()


@lru_cache(maxsize=16)
def _sincos_cached(embed_dim: int, grid_hw: Tuple[int, int]) -> Tensor:
    h, w = grid_hw
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing='ij')
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(pos: Tensor) -> Tensor:  # (h*w,) -> (h*w, D/2)
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).unsqueeze(0)


def resize_pos_embed(pos_embed: Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> Tensor:
    """Bicubic (align_corners=False) resize of a (1, src_h*src_w, C) position embedding to (1, dst_h*dst_w, C)."""
    if tuple(src_hw) == tuple(dst_hw):
        return pos_embed
    c = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, src_hw[0], src_hw[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_hw), mode='bicubic', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_hw[0] * dst_hw[1], c)


def patchify(imgs: Tensor, p: int = PATCH) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), L = (H/p)(W/p), pixels ordered (row, column, channel)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum('bchpwq->bhwpqc', x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, grid_hw: Tuple[int, int], p: int = PATCH, channels: int = 3) -> Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of :func:`patchify`."""
    b = x.shape[0]
    h, w = grid_hw
    x = x.reshape(b, h, w, p, p, channels)
    return torch.einsum('bhwpqc->bchpwq', x).reshape(b, channels, h * p, w * p)


def random_mask(batch: int, num_tokens: int, mask_ratio: float, device=None,
                generator: torch.Generator = None) -> Tensor:
    """(B, L) bool, True = masked, with exactly int(L * (1 - mask_ratio)) visible tokens in every row."""
    num_visible = int(num_tokens * (1 - mask_ratio))
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank >= num_visible


def upsample_mask(mask: Tensor, grid_hw: Tuple[int, int], scale: int) -> Tensor:
    """(B, L) token mask on an (h, w) grid -> (B, 1, h*scale, w*scale): each token's value repeated in a block."""
    m = mask.reshape(mask.shape[0], 1, grid_hw[0], grid_hw[1])
    return m.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def visible_indices(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Return (ids_keep (B, Lv), ids_restore (B, L)) for a (B, L) bool mask with equal visible counts per row.

    ids_keep lists visible tokens in raster order; ids_restore maps [visible..., masked...] back to raster order.
    """
    ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)
    num_visible = int((~mask[0]).sum())
    return ids_shuffle[:, :num_visible], ids_shuffle.argsort(dim=1)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """(B, L, C) gathered at (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
