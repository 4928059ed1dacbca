"""Block-wise masking: everything ConvMAE pretraining does with the mask, in one place.

Convention everywhere: a mask is a (B, L) bool tensor over the stage-3 token grid (h, w) in raster order,
**True = masked**, with the same number of visible tokens in every row. One :class:`BlockMask` is made per
step from it and passed down the encoder; it carries the indices the decoder needs and moves stage-1/2
features between the two layouts the encoder runs on:

* dense: channels-last maps over the whole image, (B, h*S, w*S, C), where masked positions are zeroed right
  before every depthwise convolution (masked convolution, as the official code does);
* sparse: only the positions under visible tokens, (B, Lv, S, S, C), S = 4 at H/4, 2 at H/8, 1 at H/16.

In training the mask is a function of the sample: the pipeline transform :class:`RandomBlockMask` draws it
under the sample's seeded RNG and :func:`pack_mask` / :func:`batch_masks` carry it to the pretrainer.

All stage-1/2 layers act position-wise (channels last) except the depthwise convolution, so
:func:`masked_depthwise_conv` is the only place where the two layouts differ (compare Hiera's
``do_masked_conv``). Convolutions whose kernel equals their stride act on non-overlapping patches, so on
either layout they are a reshape and a matrix product (:func:`conv_as_linear`).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.transforms import BaseTransform
from mmengine.structures import BaseDataElement
from torch import Tensor, nn


class BlockMask:
    """A block-wise mask, made once per step.

    Args:
        mask: (B, L) bool, True = masked, L = h * w.
        grid: the token grid (h, w).
        num_visible: the number of visible tokens per image, when known in advance (e.g. from the mask ratio).
            Under ``torch.compile`` it is then checked without reading the mask on the host
            (``torch._assert_async``), so that the mask's values never enter a compiled graph's control flow;
            without it, it is read from the mask.

    Attributes:
        mask: (B, L) bool, True = masked.
        grid: (h, w).
        num_visible: Lv, visible tokens per image.
        ids_keep: (B, Lv) raster indices of the visible tokens, in raster order.
        ids_restore: (B, L) position in ``[visible..., masked...]`` of every raster token.
    """

    def __init__(self, mask: Tensor, grid: Tuple[int, int], num_visible: Optional[int] = None):
        b = mask.shape[0]
        h, w = grid
        if mask.dim() != 2 or mask.shape[1] != h * w:
            raise ValueError(f'mask must have shape (B, L) = ({b}, {h * w}) for a {h}x{w} token grid, got '
                             f'{tuple(mask.shape)}')
        mask = mask.bool()
        visible = (~mask).sum(dim=1)
        if num_visible is None:
            if (visible != visible[0]).any() or visible[0] == 0:
                raise ValueError(f'every image needs the same, non-zero number of visible tokens; got '
                                 f'{visible.tolist()}')
            num_visible = int(visible[0])
        else:
            if not 0 < num_visible <= h * w:
                raise ValueError(f'num_visible must be in [1, {h * w}], got {num_visible}')
            msg = f'every mask must leave exactly {num_visible} of {h * w} tokens visible'
            if torch.compiler.is_compiling():
                torch._assert_async((visible == num_visible).all(), msg)
            elif (visible != num_visible).any():
                raise ValueError(f'{msg}; got {visible.tolist()}')
        self.mask, self.grid = mask, (int(h), int(w))
        self.num_visible = int(num_visible)
        ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)
        self.ids_keep = ids_shuffle[:, :self.num_visible]
        self.ids_restore = ids_shuffle.argsort(dim=1)
        self._batch = torch.arange(b, device=mask.device)[:, None].expand_as(self.ids_keep)
        self._rows = torch.div(self.ids_keep, w, rounding_mode='floor')
        self._cols = self.ids_keep % w

    @classmethod
    def random(cls, batch: int, grid: Tuple[int, int], mask_ratio: float, device=None,
               generator: Optional[torch.Generator] = None) -> 'BlockMask':
        """Exactly ``int(L * (1 - mask_ratio))`` visible tokens per image, drawn independently per image."""
        num_tokens = grid[0] * grid[1]
        return cls(random_mask(batch, num_tokens, mask_ratio, device, generator), grid,
                   int(num_tokens * (1 - mask_ratio)))

    # ------------------------------------------------------------------------------------- tokens (B, L, C)
    def keep(self, x: Tensor) -> Tensor:
        """(B, L, C) in raster order -> (B, Lv, C), the visible tokens."""
        return gather_tokens(x, self.ids_keep)

    def restore(self, x: Tensor) -> Tensor:
        """(B, L, C) ordered ``[visible..., masked...]`` -> raster order."""
        return gather_tokens(x, self.ids_restore)

    def visible_tokens(self, x: Tensor) -> Tensor:
        """Channels-last features at the token resolution, dense (B, h, w, C) or sparse (B, Lv, 1, 1, C) ->
        the visible tokens (B, Lv, C) in raster order."""
        return x.flatten(1, 3) if x.dim() == 5 else self.keep(x.flatten(1, 2))

    # -------------------------------------------------------------------------------------------- maps
    def upsample(self, scale: int) -> Tensor:
        """(B, 1, h*scale, w*scale) bool, True at masked positions: every token's value repeated in a block."""
        return upsample_mask(self.mask, self.grid, scale)

    def zero_masked(self, x: Tensor) -> Tensor:
        """Dense channels-last map (B, h*S, w*S, C) with masked positions set to zero."""
        scale = x.shape[1] // self.grid[0]
        keep = ~self.upsample(scale)[:, 0, :, :, None]  # (B, h*S, w*S, 1)
        return x * keep.to(x.dtype)

    def scatter(self, x: Tensor, halo: int = 0) -> Tensor:
        """Sparse (B, Lv, S, S, C) -> dense channels-last (B, h*S, w*S, C), zeros at masked positions; with a
        ``halo``, framed by that many rows and columns of zeros: (B, h*S + 2*halo, w*S + 2*halo, C)."""
        b, _, s, _, c = x.shape
        h, w = self.grid
        dense = x.new_zeros(b, h * s + 2 * halo, w * s + 2 * halo, c)
        inner = dense[:, halo:halo + h * s, halo:halo + w * s].view(b, h, s, w, s, c)
        # advanced indices on dims 0, 1, 3 around a slice: the indexed view is (B, Lv, S, S, C)
        inner[self._batch, self._rows, :, self._cols] = x
        return dense

    def gather(self, x: Tensor) -> Tensor:
        """Dense channels-last (B, h*S, w*S, C) -> sparse (B, Lv, S, S, C): the blocks under visible tokens."""
        b, hs, ws, c = x.shape
        h, w = self.grid
        s = hs // h
        if hs != h * s or ws != w * s:
            raise ValueError(f'a {hs}x{ws} map is not a whole multiple of the {h}x{w} token grid')
        return x.reshape(b, h, s, w, s, c)[self._batch, self._rows, :, self._cols]

    def windows(self, x: Tensor, halo: int) -> Tensor:
        """Sparse (B, Lv, S, S, C) -> (B, Lv, S+2*halo, S+2*halo, C): every visible block with ``halo`` pixels
        of its neighbourhood around it, zero at masked positions and outside the image."""
        s = x.shape[2]
        dense = self.scatter(x, halo)
        span = torch.arange(s + 2 * halo, device=x.device)
        rows = (self._rows * s)[:, :, None, None] + span[:, None]
        cols = (self._cols * s)[:, :, None, None] + span[None, :]
        return dense[self._batch[:, :, None, None], rows, cols]


def masked_depthwise_conv(conv: nn.Conv2d, x: Tensor, mask: Optional[BlockMask] = None) -> Tensor:
    """The depthwise convolution of a stage-1/2 block on channels-last features, masked.

    x is dense (B, H, W, C) or sparse (B, Lv, S, S, C). Dense with a mask: masked positions are zeroed before
    the convolution; sparse: the visible blocks are scattered into a zero-filled map, convolved and gathered
    back (:class:`SparseDepthwiseConv`, with its own backward). Both give the same values at visible positions,
    which never see masked content.
    """
    if x.dim() == 5:
        if mask is None:
            raise ValueError('sparse (B, Lv, S, S, C) features need their BlockMask')
        return SparseDepthwiseConv.apply(x, conv.weight, conv.bias, mask)
    if mask is not None:
        x = mask.zero_masked(x)
    return _depthwise(x, conv.weight, conv.bias)


class SparseDepthwiseConv(torch.autograd.Function):
    """A stride-1, 'same'-padded depthwise convolution (odd kernel k, weight (C, 1, k, k)) of the visible
    blocks (B, Lv, S, S, C) -> (B, Lv, S, S, C), with masked positions read as zero.

    The same values as ``conv`` on the scattered dense map gathered back (what the forward computes), with a
    backward that is cheaper than autograd's: the input gradient is the conv of the scattered output gradient
    with the flipped kernel (a forward convolution), and the weight gradient sums, for each of the k*k kernel
    offsets, output gradient x input over the visible blocks only, from the (S+k-1)^2 input window of every
    block, rebuilt from the saved sparse input (only x is kept, not its dense map). On CPU, oneDNN's weight
    gradient of a depthwise conv over the whole map is many times slower than its forward, in bf16 even more so.
    Accumulates in at least fp32; input and output keep the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: BlockMask) -> Tensor:
        k = weight.shape[-1]
        if weight.shape[1] != 1 or weight.shape[0] != x.shape[-1] or k % 2 == 0 or weight.shape[-2] != k:
            raise ValueError(f'expected a depthwise (C, 1, k, k) weight with odd k for {x.shape[-1]} channels, '
                             f'got {tuple(weight.shape)}')
        ctx.save_for_backward(x, weight)
        ctx.mask, ctx.has_bias = mask, bias is not None
        return mask.gather(_depthwise(mask.scatter(x, k // 2), weight, bias, padding=0))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        mask: BlockMask = ctx.mask
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(-2, -1).to(grad.dtype)
            grad_x = mask.gather(_depthwise(mask.scatter(grad, weight.shape[-1] // 2), flipped, None, padding=0))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _depthwise_weight_grad(mask.windows(x, weight.shape[-1] // 2), grad).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            acc = torch.promote_types(grad.dtype, torch.float32)
            grad_b = grad.sum(dim=(0, 1, 2, 3), dtype=acc).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def _depthwise(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Optional[int] = None) -> Tensor:
    """Stride-1 depthwise conv (C, 1, k, k) of a channels-last (B, H, W, C) map; 'same' padding (k // 2) by
    default, ``padding=0`` for a map that already carries its zero frame."""
    padding = weight.shape[-1] // 2 if padding is None else padding
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=padding, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1)


def _depthwise_weight_grad(windows: Tensor, grad: Tensor) -> Tensor:
    """Weight gradient (C, 1, k, k) of a 'valid' depthwise conv from its input windows (..., S+k-1, S+k-1, C)
    and output gradient (..., S, S, C): for every kernel offset (i, j), the sum of grad * window[i:i+S, j:j+S]."""
    s = grad.shape[-2]
    k = windows.shape[-2] - s + 1
    acc = torch.promote_types(grad.dtype, torch.float32)
    grad, windows = grad.to(acc), windows.to(acc)
    dims = tuple(range(grad.dim() - 1))
    out = torch.stack([(grad * windows[..., i:i + s, j:j + s, :]).sum(dim=dims)
                       for i in range(k) for j in range(k)])  # (k*k, C)
    return out.t().reshape(-1, 1, k, k)


def split_blocks(x: Tensor, size: int) -> Tensor:
    """(..., Sh, Sw, C) -> (..., Sh/size, Sw/size, size, size, C): non-overlapping size x size patches."""
    *lead, s_h, s_w, c = x.shape
    x = x.reshape(*lead, s_h // size, size, s_w // size, size, c)
    n = len(lead)
    return x.permute(*range(n), n, n + 2, n + 1, n + 3, n + 4)


def conv_as_linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A Conv2d with kernel == stride (no padding, groups 1) on channels-last features of either layout.

    x (..., Sh, Sw, C_in) with Sh, Sw multiples of the kernel k -> (..., Sh/k, Sw/k, C_out); identical to
    ``conv`` on the corresponding NCHW map. The weight (C_out, C_in, k, k) is used as (C_out, k*k*C_in).
    """
    k = conv.kernel_size[0]
    weight = linear_weight(conv)
    if k == 1:
        return F.linear(x, weight, conv.bias)
    return F.linear(split_blocks(x, k).flatten(-3), weight, conv.bias)


def linear_weight(conv: nn.Conv2d) -> Tensor:
    """The (C_out, C_in, k, k) weight of a kernel == stride Conv2d as the (C_out, k*k*C_in) matrix that
    :func:`conv_as_linear` multiplies channels-last patches with (a view for k = 1)."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)


def random_mask(batch: int, num_tokens: int, mask_ratio: float, device=None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """(B, L) bool, True = masked, with exactly int(L * (1 - mask_ratio)) visible tokens in every row."""
    num_visible = int(num_tokens * (1 - mask_ratio))
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank >= num_visible


def upsample_mask(mask: Tensor, grid: Tuple[int, int], scale: int) -> Tensor:
    """(B, L) token mask on an (h, w) grid -> (B, 1, h*scale, w*scale): each token's value repeated in a block."""
    m = mask.reshape(mask.shape[0], 1, grid[0], grid[1])
    return m.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """(B, L, C) gathered at (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ------------------------------------------------------------------------------ masks drawn by the pipeline
class RandomBlockMask(BaseTransform):
    """Draw ``results['mask']``: (L,) bool, True = masked, over the (input / patch) token grid, with exactly
    ``int(L * (1 - mask_ratio))`` visible tokens (the rule of :func:`~.models.masking.random_mask`).

    Uses torch's global RNG, which ``SeededSampler`` (convmae_backbone.data) seeds per sample. Place it
    after the crop, before ``PackMAEInputs``. ``input_size`` and ``mask_ratio`` must match the model's
    ``img_size`` and ``mask_ratio`` (the model checks the number of visible tokens).
    """

    def __init__(self, input_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, mask_ratio: float = 0.75):
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or size[0] % patch_size or size[1] % patch_size or min(size) <= 0:
            raise ValueError(f'input_size {input_size} must be positive multiples of patch_size {patch_size}')
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        self.grid: Tuple[int, int] = (size[0] // patch_size, size[1] // patch_size)
        self.input_size, self.patch_size, self.mask_ratio = size, patch_size, mask_ratio

    def transform(self, results: dict) -> dict:
        img = results.get('img')
        if img is not None and hasattr(img, 'size') and not callable(img.size):  # PIL: (W, H)
            if tuple(img.size[::-1]) != self.input_size:
                raise ValueError(f'RandomBlockMask expects {self.input_size} images (put it after the crop), got '
                                 f'{tuple(img.size[::-1])}')
        results['mask'] = random_mask(1, self.grid[0] * self.grid[1], self.mask_ratio)[0]
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(input_size={self.input_size}, patch_size={self.patch_size}, '
                f'mask_ratio={self.mask_ratio})')


def pack_mask(results: dict, packed: dict) -> dict:
    """Add ``data_samples=BaseDataElement(mask=(L,) bool)`` to ``packed`` when ``results`` holds a mask."""
    if 'mask' in results:
        packed['data_samples'] = BaseDataElement(mask=results['mask'])
    return packed


def batch_masks(data_samples: Optional[Sequence]) -> Optional[Tensor]:
    """The (B, L) bool masks of a batch's data samples, or None when they carry none."""
    if not data_samples:
        return None
    masks = [getattr(s, 'mask', None) if not isinstance(s, dict) else s.get('mask') for s in data_samples]
    if all(m is None for m in masks):
        return None
    if any(m is None for m in masks):
        raise ValueError('some data samples of the batch carry a mask and some do not')
    return torch.stack([torch.as_tensor(m) for m in masks]).bool()
