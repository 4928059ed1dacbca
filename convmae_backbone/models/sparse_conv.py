"""Stage-1/2 convolutions on channels-last features, in either layout of :class:`~.masking.BlockMask`.

All stage-1/2 layers act position-wise (channels last) except the depthwise convolution, so
:func:`masked_depthwise_conv` is the only place where the dense and sparse layouts differ (compare Hiera's
``do_masked_conv``); on the sparse layout it is :class:`SparseDepthwiseConv`, with its own backward.
Convolutions whose kernel equals their stride act on non-overlapping patches, so on either layout they are a
reshape and a matrix product (:func:`conv_as_linear`).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masking import BlockMask
from .utils import is_traced

def masked_depthwise_conv(conv: nn.Conv2d, x: Tensor, mask: Optional[BlockMask] = None) -> Tensor:
    """The depthwise convolution of a stage-1/2 block on channels-last features, masked.

    x is dense (B, H, W, C) or sparse (B, Lv, S, S, C). Dense with a mask: masked positions are zeroed before
    the convolution; sparse: the visible blocks are scattered into a zero-filled map, convolved and gathered
    back (:class:`SparseDepthwiseConv`, with its own backward). Both give the same values at visible positions,
    which never see masked content.
    """
    if not is_traced(x) and x.dim() == 5:  # torch.fx traces the dense encoder only
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
    return x.unflatten(-2, (-1, size)).unflatten(-4, (-1, size)).transpose(-4, -3)  # any rank (torch.fx too)


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
