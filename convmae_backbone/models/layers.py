"""Building blocks of the ConvMAE encoder (ConvViT) and the MAE decoder.

Parameter names follow the official ConvMAE code so released checkpoints load without conversion.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn


def channels_last_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """Apply a LayerNorm over the channels of an NCHW map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- sparse helpers
# The sparse pretraining path keeps stage-1/2 features only for visible positions, channels last and grouped
# per visible H/16 token: (B, Lv, S, S, C) with S = 4 at H/4, 2 at H/8, 1 at H/16. Convolutions whose kernel
# equals their stride (patch embeddings, fusion convs, 1x1 convs) act on non-overlapping patches, so on this
# layout they are a reshape plus a matrix product with the Conv2d weight.

def split_blocks(x: Tensor, size: int) -> Tensor:
    """(..., S, S, C) -> (..., S/size, S/size, size, size, C): non-overlapping size x size patches."""
    *lead, s_h, s_w, c = x.shape
    x = x.reshape(*lead, s_h // size, size, s_w // size, size, c)
    n = len(lead)
    return x.permute(*range(n), n, n + 2, n + 1, n + 3, n + 4)


def conv_as_linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A Conv2d with kernel == stride (and no padding, groups 1) on channels-last blocks.

    x (..., S, S, C_in), S a multiple of the kernel k -> (..., S/k, S/k, C_out); identical to ``conv`` on the
    corresponding NCHW map. The weight (C_out, C_in, k, k) is reordered to (C_out, k*k*C_in).
    """
    k = conv.kernel_size[0]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    if k == 1:
        return F.linear(x, weight, conv.bias)
    return F.linear(split_blocks(x, k).flatten(-3), weight, conv.bias)


class VisibleGrid:
    """Where the visible tokens of a block-wise mask sit on the H/16 grid, to move stage-1/2 features between
    the sparse layout (B, Lv, S, S, C) and a zero-filled dense channels-last map (B, h*S, w*S, C).

    Args:
        ids_keep: (B, Lv) raster indices of the visible H/16 tokens.
        hw: the H/16 grid (h, w).
    """

    def __init__(self, ids_keep: Tensor, hw: Tuple[int, int]):
        self.hw = tuple(hw)
        self.batch = torch.arange(ids_keep.shape[0], device=ids_keep.device)[:, None].expand_as(ids_keep)
        self.rows = torch.div(ids_keep, hw[1], rounding_mode='floor')
        self.cols = ids_keep % hw[1]

    def scatter(self, tokens: Tensor) -> Tensor:
        """(B, Lv, S, S, C) -> (B, h*S, w*S, C) with zeros at masked positions."""
        b, _, s, _, c = tokens.shape
        h, w = self.hw
        dense = tokens.new_zeros(b, h, s, w, s, c)
        # advanced indices on dims 0, 1, 3 around a slice: the indexed view is (B, Lv, S, S, C)
        dense[self.batch, self.rows, :, self.cols] = tokens
        return dense.view(b, h * s, w * s, c)

    def gather(self, dense: Tensor, size: int) -> Tensor:
        """(B, h*S, w*S, C) channels-last map -> (B, Lv, S, S, C) at the visible tokens, S = ``size``."""
        b, c = dense.shape[0], dense.shape[-1]
        h, w = self.hw
        return dense.reshape(b, h, size, w, size, c)[self.batch, self.rows, :, self.cols]


class PatchEmbed(nn.Module):
    """Strided conv -> LayerNorm (eps 1e-5) -> GELU: (B, C_in, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(channels_last_norm(self.norm, self.proj(x)))

    def forward_blocks(self, x: Tensor) -> Tensor:
        """Channels-last blocks (..., S, S, C_in) -> (..., S/s, S/s, C); same values as :meth:`forward`."""
        return self.act(self.norm(conv_as_linear(self.proj, x)))


class ConvBlock(nn.Module):
    """ConvMAE stage-1/2 block: pre-norm, 1x1 conv, 5x5 depthwise conv (in place of attention), 1x1 conv, conv MLP.

    With ``visible`` (B, 1, H, W) given, positions where it is 0 are zeroed right before the depthwise conv
    (masked convolution), so visible positions never see masked content. In eval mode without autograd the MLP
    runs in slabs of rows to bound peak memory on large inputs.
    """

    mlp_slab_numel = 1 << 23  # hidden elements per slab of rows in :meth:`_mlp_inference` (32 MiB float32)

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, kernel_size: int = 5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), use_conv=True)

    def forward(self, x: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        y = self.conv1(channels_last_norm(self.norm1, x))
        if visible is not None:
            y = y * visible
        x = x + self.drop_path(self.conv2(self.attn(y)))
        if torch.is_grad_enabled() or self.training:
            return x + self.drop_path(self.mlp(channels_last_norm(self.norm2, x)))
        return self._mlp_inference(x)

    def _mlp_inference(self, x: Tensor) -> Tensor:
        """x + MLP(norm2(x)) for (B, C, H, W) without autograd, in slabs of rows so that the 4x wider hidden
        map (268 MB at H/4 of a 1024x1024 image for C=256) never exists whole. Pointwise, hence identical."""
        b, c, h, w = x.shape
        rows = max(1, self.mlp_slab_numel // (b * w * self.mlp.fc1.out_channels))
        if rows >= h:
            return x + self.mlp(channels_last_norm(self.norm2, x))
        out = torch.empty_like(x)
        for r in range(0, h, rows):
            part = x[:, :, r:r + rows]
            out[:, :, r:r + rows] = part + self.mlp(channels_last_norm(self.norm2, part))
        return out

    def forward_sparse(self, x: Tensor, grid: VisibleGrid) -> Tensor:
        """The masked block on visible positions only: x (B, Lv, S, S, C) -> (B, Lv, S, S, C).

        Everything but the depthwise conv is pointwise and runs on the visible positions; the depthwise conv
        sees the zero-filled dense map, so the result equals :meth:`forward` with the mask at these positions.
        """
        y = conv_as_linear(self.conv1, self.norm1(x))
        y = grid.scatter(y)                                   # (B, h*S, w*S, C), zeros where masked
        y = self.attn(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # NCHW view of channels-last memory
        y = grid.gather(y, x.shape[2])                        # (B, Lv, S, S, C)
        x = x + self.drop_path(conv_as_linear(self.conv2, y))
        mlp = self.mlp
        y = mlp.drop1(mlp.act(conv_as_linear(mlp.fc1, self.norm2(x))))
        y = mlp.drop2(conv_as_linear(mlp.fc2, mlp.norm(y)))
        return x + self.drop_path(y)


def relative_position_table(rel_pos: Tensor, size: int) -> Tensor:
    """Look up a (2*size-1, C) relative-position table as (size, size, C) indexed [query, key].

    A table learnt for another size is resized linearly first (as for windows of another size).
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode='linear').squeeze(0).t()
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


class Attention(nn.Module):
    """Multi-head self-attention with optional decomposed relative position bias (ViTDet style).

    ``fused=True`` uses ``F.scaled_dot_product_attention``, which never forms the (N, N) attention matrix.
    The relative position bias (and key padding) enters it as an additive mask; so that the mask does not grow
    to the size of the attention matrix either, queries are processed in chunks of whole grid rows whenever the
    mask would exceed ``max_bias_numel`` elements (each query row is independent, the result is the same).
    ``fused=False`` is the explicit softmax(QK^T)V formulation, kept as a reference for tests and benchmarks.
    """

    max_bias_numel = 1 << 24  # 64 MiB of float32 mask per chunk

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_size: Tuple[int, int] = (14, 14)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.fused = True
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))

    def rel_pos_bias(self, q: Tensor, hw: Tuple[int, int], row_start: int = 0,
                     out: Optional[Tensor] = None) -> Tensor:
        """Queries of grid rows ``row_start ..`` q (B, heads, rows*w, d) -> additive bias (B, heads, rows*w, h*w).

        ``out``: an optional contiguous buffer of that size to write into (without autograd only).
        """
        h, w = hw
        b, nh, n, d = q.shape
        rows = n // w
        r_q = q.reshape(b, nh, rows, w, d)
        table_h = relative_position_table(self.rel_pos_h, h)[row_start:row_start + rows]  # (rows, h, d)
        rel_h = torch.einsum('bnhwc,hkc->bnhwk', r_q, table_h)[..., :, None]             # (b, nh, rows, w, h, 1)
        rel_w = torch.einsum('bnhwc,wkc->bnhwk', r_q, relative_position_table(self.rel_pos_w, w))[..., None, :]
        if out is None:
            return (rel_h + rel_w).reshape(b, nh, n, h * w)
        torch.add(rel_h, rel_w, out=out.view(b, nh, rows, w, h, w))
        return out

    def _mask(self, q: Tensor, hw: Optional[Tuple[int, int]], pad: Optional[Tensor], row_start: int = 0,
              out: Optional[Tensor] = None) -> Optional[Tensor]:
        """Additive attention mask for the queries ``q``: relative position bias plus key padding (-inf)."""
        bias = self.rel_pos_bias(q, hw, row_start, out) if self.use_rel_pos else None
        if pad is None:
            return bias
        if bias is None:
            return pad
        return bias.add_(pad) if out is not None else bias + pad

    def forward(self, x: Tensor, hw: Optional[Tuple[int, int]] = None,
                key_padding: Optional[Tensor] = None) -> Tensor:
        """x (B, N, C); hw: the (h, w) token grid (needed for relative position bias);
        key_padding (B, N) bool, True = padding token that no query may attend to."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos and hw is None:
            raise ValueError('relative position bias needs the token grid (hw)')
        pad = None
        if key_padding is not None:
            pad = torch.zeros(key_padding.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(key_padding, float('-inf'))[:, None, None, :]  # (B, 1, 1, N)
        if self.fused:
            x = self._fused(q, k, v, hw, pad)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            mask = self._mask(q, hw, pad)
            if mask is not None:
                attn = attn + mask
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, hw: Optional[Tuple[int, int]], pad: Optional[Tensor]
               ) -> Tensor:
        """SDPA over (B, heads, N, d) q, k, v; query chunks of whole grid rows when the mask would be large.

        Without autograd all chunks write their mask into one buffer: a fresh large allocation per chunk costs
        more in page faults than computing the mask.
        """
        b, nh, n, _ = q.shape
        if not self.use_rel_pos or b * nh * n * n <= self.max_bias_numel:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(q, hw, pad))
        w = hw[1]
        rows = max(1, self.max_bias_numel // (b * nh * w * n))
        buf = None if torch.is_grad_enabled() else q.new_empty(b * nh * rows * w * n)
        outs = []
        for r in range(0, hw[0], rows):
            q_chunk = q[:, :, r * w:(r + rows) * w]
            out = None if buf is None else buf[:q_chunk[..., 0].numel() * n].view(b, nh, -1, n)
            outs.append(F.scaled_dot_product_attention(q_chunk, k, v,
                                                       attn_mask=self._mask(q_chunk, hw, pad, r, out)))
        return torch.cat(outs, dim=2)


def window_partition(x: Tensor, window: int) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> windows (B*nW, window*window, C), key padding (B*nW, window*window), padded (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    valid = torch.ones(1, h, w, 1, dtype=torch.bool, device=x.device)
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        valid = F.pad(valid, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w

    def split(t: Tensor) -> Tensor:
        t = t.reshape(t.shape[0], hp // window, window, wp // window, window, t.shape[-1])
        return t.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, t.shape[-1])

    padding = None
    if pad_h or pad_w:
        padding = ~split(valid).squeeze(-1).repeat(b, 1)
    return split(x), padding, (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B*nW, window*window, C) -> (B, H, W, C)."""
    hp, wp = padded_hw
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, c)[:, :hw[0], :hw[1]]


class TransformerBlock(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-6) with optional window attention, relative position bias
    and layer scale. Tokens are (B, N, C); ``hw`` gives their grid when they form one."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 window_size: int = 0, use_rel_pos: bool = False, rel_pos_size: Tuple[int, int] = (14, 14),
                 layer_scale_init_value: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, use_rel_pos=use_rel_pos,
                              rel_pos_size=(window_size, window_size) if window_size else rel_pos_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if layer_scale_init_value > 0:
            self.gamma_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _attend(self, x: Tensor, hw: Optional[Tuple[int, int]]) -> Tensor:
        if not self.window_size:
            return self.attn(x, hw)
        if hw is None:
            raise ValueError('window attention needs the token grid (hw)')
        b, _, c = x.shape
        windows, padding, padded_hw = window_partition(x.reshape(b, hw[0], hw[1], c), self.window_size)
        windows = self.attn(windows, (self.window_size, self.window_size), padding)
        return window_unpartition(windows, self.window_size, padded_hw, hw).reshape(b, -1, c)

    def forward(self, x: Tensor, hw: Optional[Tuple[int, int]] = None) -> Tensor:
        y = self._attend(self.norm1(x), hw)
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y)
