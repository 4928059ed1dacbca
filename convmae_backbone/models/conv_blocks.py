"""Stage-1/2 layers of the ConvMAE encoder, on channels-last features of either layout (see :mod:`.masking`):
dense maps (B, H, W, C) or the visible blocks (B, Lv, S, S, C) of the sparse pretraining path.

Parameter names and shapes are the official ones (1x1 convolutions stay ``nn.Conv2d``), so released
checkpoints load without conversion.
"""
from typing import Optional

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from .masking import BlockMask
from .sparse_conv import conv_as_linear, linear_weight, masked_depthwise_conv
from .utils import gelu_linear, is_traced


class PatchEmbed(nn.Module):
    """Strided conv -> LayerNorm (eps 1e-5) -> GELU: (..., Sh, Sw, C_in) -> (..., Sh/p, Sw/p, C), channels last."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(conv_as_linear(self.proj, x)))


class PointwiseMlp(nn.Module):
    """The conv blocks' MLP: 1x1 conv -> GELU -> 1x1 conv (the official ``CMlp``), on channels-last features; the
    GELU is recomputed in the backward (:func:`~.utils.gelu_linear`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return gelu_linear(conv_as_linear(self.fc1, x), linear_weight(self.fc2), self.fc2.bias)


class ConvBlock(nn.Module):
    """ConvMAE stage-1/2 block: pre-norm, 1x1 conv, k x k depthwise conv (in place of attention; 5x5 officially,
    ``kernel_size``), 1x1 conv, conv MLP.

    x: (B, H, W, C) or (B, Lv, S, S, C), channels last. With a :class:`BlockMask`, masked positions are zeroed
    right before the depthwise conv (masked convolution), so visible positions never see masked content.
    ``norm_eps``: eps of both LayerNorms (1e-5 officially, except the ViTDet-style detector's 1e-6). In
    eval mode without autograd the MLP runs in slabs along dim 1 to bound peak memory on large inputs (not when
    compiled or traced: the compiler fuses and plans memory itself, and the slab count would depend on the input
    size).
    """

    mlp_slab_numel = 1 << 23  # hidden elements per slab in :meth:`_mlp_inference` (32 MiB float32)

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, kernel_size: int = 5,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = PointwiseMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Optional[BlockMask] = None) -> Tensor:
        y = masked_depthwise_conv(self.attn, conv_as_linear(self.conv1, self.norm1(x)), mask)
        x = x + self.drop_path(conv_as_linear(self.conv2, y))
        if torch.is_grad_enabled() or self.training or torch.compiler.is_compiling() or is_traced(x):
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return self._mlp_inference(x)

    def _mlp_inference(self, x: Tensor) -> Tensor:
        """x + MLP(norm2(x)) without autograd, in slabs along dim 1 (rows of a dense map) so that the 4x wider
        hidden features (268 MB at H/4 of a 1024x1024 image for C=256) never exist whole. Pointwise, hence
        identical to the whole-map computation."""
        per_row = x[:, :1].numel() // x.shape[-1] * self.mlp.fc1.out_channels
        rows = max(1, self.mlp_slab_numel // per_row)
        if rows >= x.shape[1]:
            return x + self.mlp(self.norm2(x))
        out = torch.empty_like(x)
        for r in range(0, x.shape[1], rows):
            part = x[:, r:r + rows]
            out[:, r:r + rows] = part + self.mlp(self.norm2(part))
        return out
