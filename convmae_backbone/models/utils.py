"""Position embeddings, (un)patchify and the MLPs' GELU -> Linear, shared by the encoder, the pretrainer and the
tools."""
import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor
from torch.compiler import is_exporting


def is_traced(x: object) -> bool:
    """Whether ``x`` is a ``torch.fx`` proxy (symbolic tracing: torchvision's ``create_feature_extractor``, timm's
    FX features). Its shapes are then symbolic, so size-dependent shortcuts are not taken (as when exporting) and
    only the dense, unmasked encoder is traced."""
    return isinstance(x, torch.fx.Proxy)


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


def pos_embed_layout(tokens: int, key: str = 'pos_embed') -> Tuple[int, int]:
    """(side, class rows) of a stored position embedding of ``tokens`` rows: a square side x side grid, preceded
    by one class-token row when ``tokens`` is side * side + 1 (ConvMAE-v2; ViTDet's ``pretrain_use_cls_token``
    layout, whose row 0 belongs to the class token). Raises ``ValueError`` naming ``key`` otherwise."""
    for prefix in (0, 1):
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 0 and side * side == tokens - prefix:
            return side, prefix
    raise ValueError(f'{key} has {tokens} tokens, not a square grid (nor one after a class-token row)')


def resize_pos_embed(pos_embed: Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> Tensor:
    """Bicubic (align_corners=False, no antialiasing, as the official code) resize of a (1, src_h*src_w, C)
    position embedding to (1, dst_h*dst_w, C). Computed in float32, or in float64 for a float64 embedding (timm's
    ``resample_abs_pos_embed`` would round that to float32)."""
    if not torch.compiler.is_exporting() and tuple(src_hw) == tuple(dst_hw):  # no size guard when exporting
        return pos_embed
    if pos_embed.dtype == torch.float64:
        grid = pos_embed.reshape(1, src_hw[0], src_hw[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(dst_hw), mode='bicubic', align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])
    return resample_abs_pos_embed(pos_embed, list(dst_hw), list(src_hw), num_prefix_tokens=0,
                                  interpolation='bicubic', antialias=False)


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), L = (H/p)(W/p), pixels ordered (row, column, channel)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum('bchpwq->bhwpqc', x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, grid_hw: Tuple[int, int], p: int, channels: int = 3) -> Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of :func:`patchify`."""
    b = x.shape[0]
    h, w = grid_hw
    x = x.reshape(b, h, w, p, p, channels)
    return torch.einsum('bhwpqc->bchpwq', x).reshape(b, channels, h * p, w * p)


def norm_pix(patches: Tensor, eps: float = 1.0e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """MAE's normalised-pixel target of patchified pixels (B, L, D): each patch minus its mean, divided by
    sqrt(its unbiased variance + eps). Returns (normalised (B, L, D), mean (B, L, 1), std (B, L, 1)); a prediction
    in the normalised space goes back to pixels as ``pred * std + mean``."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps) ** 0.5
    return (patches - mean) / std, mean, std


def gelu_linear(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` (exact GELU), the second half of every MLP of the encoder and the
    decoder. Under autograd only ``h`` is kept for the backward and the GELU is recomputed there
    (:class:`GeluLinear`): the MLPs then hold one hidden-size activation instead of two. Same values and
    gradients (the same operations); without autograd, when exporting or tracing, the plain expression."""
    if (torch.is_grad_enabled() and not is_exporting() and not is_traced(h)
            and (h.requires_grad or weight.requires_grad)):
        return GeluLinear.apply(h, weight, bias)
    return F.linear(F.gelu(h), weight, bias)


class GeluLinear(torch.autograd.Function):
    """linear(gelu(h)) saving only ``h`` (see :func:`gelu_linear`). h (..., hidden), weight (out, hidden).

    Under autocast the forward's operations are autocast as usual; the backward repeats them in the dtype the
    forward computed in (that of its output) and returns the parameter gradients in the parameters' dtype."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        out = F.linear(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        dtype = grad.dtype
        grad_h = grad_w = grad_b = None
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_a = (flat @ weight.to(dtype)).view(*grad.shape[:-1], weight.shape[1])
            grad_h = torch.ops.aten.gelu_backward(grad_a.to(h.dtype), h)
        if ctx.needs_input_grad[1]:
            grad_w = (flat.t() @ F.gelu(h).to(dtype).reshape(-1, h.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(weight.dtype)
        return grad_h, grad_w, grad_b
