"""Stage-3 (and decoder) transformer layers: multi-head attention with windows and relative position bias.

Relative position bias comes in two forms, both added to the attention logits through the SDPA mask:

- decomposed (ViTDet): per-block ``rel_pos_h``/``rel_pos_w`` ((2*size-1, head_dim) each), the bias depends on
  the query;
- table (BEiT, as the official ConvMAE detection and segmentation backbones): ``relative_position_bias_table``
  ((2h-1)(2w-1), heads), one learnt value per head and 2-D offset, gathered through ``relative_position_index``.
  A table is owned by the attention (one per block) or by :class:`RelativePositionBias` and shared by several
  blocks. ``relative_position_index`` is a non-persistent buffer: it is recomputed, never read from or written to
  checkpoints.

A table built for a (h, w) grid serves any other grid: it is resized bicubically over its (2h-1, 2w-1) offsets
(:func:`resize_relative_position_table`) at load time (:mod:`.weights`) and, for inputs of another size, at
every forward.

Under ``torch.export`` (symbolic height and width) the size-dependent shortcuts are not taken: tables are always
resized (a resize to the same size is the identity), windows are always padded with a key-padding mask, and the
attention is never chunked; under ``torch.compile`` no shared bias buffer is reused. The results are the same.
"""
from typing import Optional, Tuple

import torch
from torch.compiler import is_compiling, is_exporting
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .utils import gelu_linear, is_traced

#: Relative position bias of one attention layer: none, ViTDet's decomposed tables, or its own BEiT table.
ATTENTION_REL_POS = ('none', 'decomposed', 'table')
#: What the padding tokens of a window that overhangs the grid are (``window_padding`` of
#: :class:`TransformerBlock`): ``'masked'`` keys no query attends to, or ``'zeros'``, zero tokens (after
#: ``norm1``) that every query attends to, as ViTDet and the official ViTDet-style ConvMAE detector.
WINDOW_PADDING = ('masked', 'zeros')


def relative_position_table(rel_pos: Tensor, size: int) -> Tensor:
    """Look up a (2*size-1, C) relative-position table as (size, size, C) indexed [query, key].

    A table learnt for another size is resized linearly first (as for windows of another size).
    """
    length = 2 * size - 1
    if is_exporting() or rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode='linear').squeeze(0).t()
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


def relative_position_index(hw: Tuple[int, int], row_start: int = 0, rows: Optional[int] = None,
                            device: Optional[torch.device] = None) -> Tensor:
    """BEiT index of the queries in grid rows ``row_start .. row_start + rows`` (all rows by default) against all
    keys of a (h, w) grid: (rows*w, h*w) long, ``(dy + h - 1) * (2w - 1) + dx + w - 1`` for the offset
    (dy, dx) = query position - key position, tokens in raster order."""
    h, w = hw
    rows = h - row_start if rows is None else rows
    # broadcast and flatten (not repeat_interleave/repeat, which ONNX export mis-expands for symbolic h, w)
    ys = torch.arange(h, device=device)[:, None].expand(h, w).reshape(-1)
    xs = torch.arange(w, device=device)[None, :].expand(h, w).reshape(-1)
    q = slice(row_start * w, (row_start + rows) * w)
    return (ys[q, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[q, None] - xs[None, :] + w - 1)


def resize_relative_position_table(table: Tensor, src: Tuple[int, int], dst: Tuple[int, int]) -> Tensor:
    """A ((2*src_h-1)(2*src_w-1), heads) BEiT table for a ``src`` grid -> ((2*dst_h-1)(2*dst_w-1), heads) for a
    ``dst`` grid: bicubic interpolation (align_corners=False) over the 2-D offsets, one channel per head, as the
    official segmentation code (``mmcv_custom/checkpoint.py``) resizes tables at load time."""
    src, dst = tuple(src), tuple(dst)
    if not is_exporting() and src == dst:
        return table
    heads = table.shape[1]
    grid = table.t().reshape(1, heads, 2 * src[0] - 1, 2 * src[1] - 1)
    grid = F.interpolate(grid, size=(2 * dst[0] - 1, 2 * dst[1] - 1), mode='bicubic', align_corners=False)
    return grid.reshape(heads, -1).t()


def _init_table(module: nn.Module, size: Tuple[int, int], num_heads: int) -> None:
    """Give ``module`` a zero BEiT table for a ``size`` grid and its non-persistent index."""
    module.table_size = (int(size[0]), int(size[1]))
    h, w = module.table_size
    module.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), num_heads))
    module.register_buffer('relative_position_index', relative_position_index(module.table_size), persistent=False)


def table_bias(module: nn.Module, hw: Tuple[int, int], row_start: int = 0, rows: Optional[int] = None) -> Tensor:
    """Additive bias (1, heads, rows*w, h*w) from ``module``'s BEiT table for the query rows ``row_start ..`` of a
    (h, w) grid; the table is resized when the grid is not the one it was built for."""
    h, w = hw
    rows = h - row_start if rows is None else rows
    table = module.relative_position_bias_table
    if not is_exporting() and tuple(hw) == module.table_size:
        index = module.relative_position_index[row_start * w:(row_start + rows) * w]
    else:
        table = resize_relative_position_table(table, module.table_size, hw)
        index = relative_position_index(hw, row_start, rows, device=table.device)
    # index_select on the contiguous (heads, entries) table: faster than advanced indexing, forward and backward;
    # 4-D, because with a 3-D mask CPU SDPA falls back from its flash kernel to the math kernel
    heads = table.shape[1]
    return table.t().contiguous().index_select(1, index.reshape(-1)).reshape(1, heads, index.shape[0], index.shape[1])


class RelativePositionBias(nn.Module):
    """A BEiT relative position table shared by several attention layers (the official detection backbone's
    ``windowed_rel_pos_bias`` and ``global_rel_pos_bias``).

    Args:
        size: the (h, w) token grid (window) the table is built for.
        num_heads: attention heads (one table column each).
    """

    def __init__(self, size: Tuple[int, int], num_heads: int):
        super().__init__()
        _init_table(self, size, num_heads)

    def forward(self, hw: Tuple[int, int], row_start: int = 0, rows: Optional[int] = None) -> Tensor:
        """Bias (1, heads, rows*w, h*w) for the query rows ``row_start ..`` of a (h, w) grid."""
        return table_bias(self, hw, row_start, rows)

    def extra_repr(self) -> str:
        return f'size={self.table_size}, num_heads={self.relative_position_bias_table.shape[1]}'


#: Longest key sequence for which :func:`sdpa` trains reduced-precision attention on CPU with the math kernel
#: (where the math kernel's forward + backward was measured faster than flash's; 256 keys were not).
CPU_MATH_MAX_KEYS = 196


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """``F.scaled_dot_product_attention`` for (B, heads, N, d) q, k, v; the kernel choice is the only difference.

    On CPU, in bf16/fp16 with autograd and up to :data:`CPU_MATH_MAX_KEYS` keys (the pretraining encoder and
    decoder at 224), it runs SDPA's math kernel, which computes in fp32 and whose backward is much faster there
    than the flash kernel's for short sequences (``tools/benchmark.py`` measures the step). Elsewhere PyTorch
    picks (flash on CPU: never the (N, N) matrix), as it does in a ``torch.fx`` graph.
    """
    if (not is_traced(q) and q.device.type == 'cpu' and q.dtype in (torch.bfloat16, torch.float16)
            and k.shape[-2] <= CPU_MATH_MAX_KEYS and torch.is_grad_enabled() and q.requires_grad
            and not is_exporting()):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    """Multi-head self-attention with optional relative position bias.

    Computed by ``F.scaled_dot_product_attention``, which never forms the (N, N) attention matrix. The relative
    position bias (and key padding) enters it as an additive mask; so that the mask does not grow to the size of
    the attention matrix either, queries are processed in chunks of whole grid rows whenever the mask would
    exceed ``max_bias_numel`` elements (each query row is independent, the result is the same).

    Args:
        dim: token channels.
        num_heads: attention heads.
        qkv_bias: bias of the qkv projection.
        rel_pos: ``'none'``; ``'decomposed'`` (ViTDet ``rel_pos_h``/``rel_pos_w``); ``'table'`` (a BEiT
            ``relative_position_bias_table`` of this layer's own). A shared table is passed to :meth:`forward`.
        rel_pos_size: the (h, w) grid the tables are built for.
    """

    max_bias_numel = 1 << 24  # 64 MiB of float32 mask per chunk

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rel_pos: str = 'none',
                 rel_pos_size: Tuple[int, int] = (14, 14)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}')
        if rel_pos not in ATTENTION_REL_POS:
            raise ValueError(f'rel_pos must be one of {ATTENTION_REL_POS}, got {rel_pos!r}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = rel_pos
        if rel_pos == 'decomposed':
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))
        elif rel_pos == 'table':
            _init_table(self, rel_pos_size, num_heads)

    @property
    def use_rel_pos(self) -> bool:
        """Whether this layer holds relative position parameters of its own."""
        return self.rel_pos != 'none'

    def rel_pos_bias(self, q: Tensor, hw: Tuple[int, int], row_start: int = 0,
                     out: Optional[Tensor] = None) -> Tensor:
        """Decomposed bias: queries of grid rows ``row_start ..`` q (B, heads, rows*w, d) -> additive bias
        (B, heads, rows*w, h*w).

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
                  out: Optional[Tensor] = None, shared: Optional[RelativePositionBias] = None
                  ) -> Optional[Tensor]:
        """Additive attention mask for the queries ``q`` (B, heads, rows*w, d): relative position bias (decomposed
        (B, heads, rows*w, N), or from a table (1, heads, rows*w, N)) plus key padding (-inf)."""
        if self.rel_pos == 'decomposed':
            bias = self.rel_pos_bias(q, hw, row_start, out)
        elif self.rel_pos == 'table' or shared is not None:
            bias = table_bias(self if shared is None else shared, hw, row_start, q.shape[2] // hw[1])
        else:
            bias = None
        if pad is None:
            return bias
        if bias is None:
            return pad
        return bias.add_(pad) if bias is out else bias + pad

    def forward(self, x: Tensor, hw: Optional[Tuple[int, int]] = None, key_padding: Optional[Tensor] = None,
                shared: Optional[RelativePositionBias] = None) -> Tensor:
        """x (B, N, C); hw: the (h, w) token grid (needed for relative position bias); key_padding (B, N) bool,
        True = padding token that no query may attend to; shared: a table shared with other layers."""
        b, n, c = x.shape
        if shared is not None and self.use_rel_pos:
            raise ValueError('an attention layer with relative position parameters of its own got a shared table')
        if (self.use_rel_pos or shared is not None) and hw is None:
            raise ValueError('relative position bias needs the token grid (hw)')
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        pad = None
        if key_padding is not None:
            pad = torch.zeros(key_padding.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(key_padding, float('-inf'))[:, None, None, :]  # (B, 1, 1, N)
        x = self.attend(q, k, v, hw, pad, shared).transpose(1, 2)
        if is_exporting():  # an explicit copy: ONNX decomposition would otherwise take this reshape for a view
            x = x.clone(memory_format=torch.contiguous_format)
        return self.proj(x.reshape(b, n, c))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hw: Optional[Tuple[int, int]], pad: Optional[Tensor],
               shared: Optional[RelativePositionBias] = None) -> Tensor:
        """softmax(q k^T * scale + mask) v for (B, heads, N, d) q, k, v, by SDPA; query chunks of whole grid rows
        when the mask would be large (never under ``torch.export``: the chunk count would depend on the symbolic
        input size).

        Without autograd (and not compiling: the compiler plans its own buffers and cannot view the shared one)
        all chunks write their decomposed bias into one buffer: a fresh large allocation per chunk costs more in
        page faults than computing the mask.
        """
        b, nh, n, _ = q.shape
        if (not (self.use_rel_pos or shared is not None) or is_exporting()
                or b * nh * n * n <= self.max_bias_numel):
            return sdpa(q, k, v, self.attn_mask(q, hw, pad, shared=shared))
        w = hw[1]
        rows = max(1, self.max_bias_numel // (b * nh * w * n))
        reuse = self.rel_pos == 'decomposed' and not torch.is_grad_enabled() and not is_compiling()
        buf = q.new_empty(b * nh * rows * w * n) if reuse else None
        outs = []
        for r in range(0, hw[0], rows):
            q_chunk = q[:, :, r * w:(r + rows) * w]
            out = None if buf is None else buf[:q_chunk[..., 0].numel() * n].view(b, nh, -1, n)
            outs.append(F.scaled_dot_product_attention(
                q_chunk, k, v, attn_mask=self.attn_mask(q_chunk, hw, pad, r, out, shared)))
        return torch.cat(outs, dim=2)


def window_partition(x: Tensor, window: int) -> Tuple[Tensor, Optional[Tensor], Tuple[int, int]]:
    """(B, H, W, C) -> windows (B*nW, window*window, C), key padding (B*nW, window*window) (None without padding,
    always a mask under ``torch.export``), padded (Hp, Wp).

    Shapes are written as window counts times ``window`` (never ``(-h) % window``), so that they stay provable
    for a symbolic H and W."""
    b, h, w, c = x.shape
    n_h, n_w = (h + window - 1) // window, (w + window - 1) // window
    hp, wp = n_h * window, n_w * window
    valid = torch.ones(1, h, w, 1, dtype=torch.bool, device=x.device)
    padded = is_exporting() or hp != h or wp != w
    if padded:
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        valid = F.pad(valid, (0, 0, 0, wp - w, 0, hp - h))

    def split(t: Tensor) -> Tensor:
        t = t.reshape(t.shape[0], n_h, window, n_w, window, t.shape[-1])
        return t.permute(0, 1, 3, 2, 4, 5).reshape(t.shape[0] * n_h * n_w, window * window, t.shape[-1])

    padding = ~split(valid).squeeze(-1).repeat(b, 1) if padded else None
    return split(x), padding, (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B*nW, window*window, C) -> (B, H, W, C)."""
    n_h, n_w = padded_hw[0] // window, padded_hw[1] // window
    c = windows.shape[-1]
    b = windows.shape[0] // (n_h * n_w)
    x = windows.reshape(b, n_h, n_w, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n_h * window, n_w * window, c)[:, :hw[0], :hw[1]]


class Mlp(nn.Module):
    """Linear -> GELU -> Linear over tokens (timm's ``Mlp`` keys ``fc1``/``fc2``); the GELU is recomputed in the
    backward (:func:`~.utils.gelu_linear`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return gelu_linear(self.fc1(x), self.fc2.weight, self.fc2.bias)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block with optional window attention, relative position bias and layer scale.

    ``rel_pos``: see :class:`Attention`; its tables are built for the window when windowed, else for
    ``rel_pos_size``. ``norm_eps``: eps of both LayerNorms. ``window_padding``: see :data:`WINDOW_PADDING`
    (padding is added to the normalised tokens either way; zero tokens have keys and values equal to the qkv
    biases).

    Tokens are (B, N, C); ``hw`` gives their grid when they form one (windows and relative position need it).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 window_size: int = 0, rel_pos: str = 'none', rel_pos_size: Tuple[int, int] = (14, 14),
                 layer_scale_init_value: float = 0.0, norm_eps: float = 1e-6, window_padding: str = 'masked'):
        super().__init__()
        if window_padding not in WINDOW_PADDING:
            raise ValueError(f'window_padding must be one of {WINDOW_PADDING}, got {window_padding!r}')
        self.window_size = window_size
        self.window_padding = window_padding
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, rel_pos=rel_pos,
                              rel_pos_size=(window_size, window_size) if window_size else rel_pos_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if layer_scale_init_value > 0:
            self.gamma_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _attend(self, x: Tensor, hw: Optional[Tuple[int, int]], shared: Optional[RelativePositionBias]) -> Tensor:
        if not self.window_size:
            return self.attn(x, hw, shared=shared)
        if hw is None:
            raise ValueError('window attention needs the token grid (hw)')
        b, _, c = x.shape
        windows, padding, padded_hw = window_partition(x.reshape(b, hw[0], hw[1], c), self.window_size)
        if self.window_padding == 'zeros':
            padding = None  # the zero tokens are keys like any other
        windows = self.attn(windows, (self.window_size, self.window_size), padding, shared)
        x = window_unpartition(windows, self.window_size, padded_hw, hw)
        if is_exporting():  # a copy whatever the padding, so that no stride guard depends on H and W
            x = x.clone(memory_format=torch.contiguous_format)
        return x.reshape(b, -1, c)

    def forward(self, x: Tensor, hw: Optional[Tuple[int, int]] = None,
                shared: Optional[RelativePositionBias] = None) -> Tensor:
        """x (B, N, C) -> (B, N, C); ``shared``: a relative position table shared with other blocks, for this
        block's grid (its window when windowed)."""
        y = self._attend(self.norm1(x), hw, shared)
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y)
