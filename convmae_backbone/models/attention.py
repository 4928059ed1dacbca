"""Stage-3 (and decoder) transformer layers: multi-head attention with windows and relative position bias."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn


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

    Computed by ``F.scaled_dot_product_attention``, which never forms the (N, N) attention matrix. The relative
    position bias (and key padding) enters it as an additive mask; so that the mask does not grow to the size of
    the attention matrix either, queries are processed in chunks of whole grid rows whenever the mask would
    exceed ``max_bias_numel`` elements (each query row is independent, the result is the same).
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

    def attn_mask(self, q: Tensor, hw: Optional[Tuple[int, int]], pad: Optional[Tensor], row_start: int = 0,
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
        x = self.attend(q, k, v, hw, pad)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hw: Optional[Tuple[int, int]], pad: Optional[Tensor]
               ) -> Tensor:
        """softmax(q k^T * scale + mask) v for (B, heads, N, d) q, k, v, by SDPA; query chunks of whole grid rows
        when the mask would be large.

        Without autograd all chunks write their mask into one buffer: a fresh large allocation per chunk costs
        more in page faults than computing the mask.
        """
        b, nh, n, _ = q.shape
        if not self.use_rel_pos or b * nh * n * n <= self.max_bias_numel:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask(q, hw, pad))
        w = hw[1]
        rows = max(1, self.max_bias_numel // (b * nh * w * n))
        buf = None if torch.is_grad_enabled() else q.new_empty(b * nh * rows * w * n)
        outs = []
        for r in range(0, hw[0], rows):
            q_chunk = q[:, :, r * w:(r + rows) * w]
            out = None if buf is None else buf[:q_chunk[..., 0].numel() * n].view(b, nh, -1, n)
            outs.append(F.scaled_dot_product_attention(q_chunk, k, v,
                                                       attn_mask=self.attn_mask(q_chunk, hw, pad, r, out)))
        return torch.cat(outs, dim=2)


def window_partition(x: Tensor, window: int) -> Tuple[Tensor, Optional[Tensor], Tuple[int, int]]:
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
    """Pre-norm ViT block with optional window attention, relative position bias and layer scale.

    Tokens are (B, N, C); ``hw`` gives their grid when they form one (windows and relative position need it).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 window_size: int = 0, use_rel_pos: bool = False, rel_pos_size: Tuple[int, int] = (14, 14),
                 layer_scale_init_value: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, use_rel_pos=use_rel_pos,
                              rel_pos_size=(window_size, window_size) if window_size else rel_pos_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
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
