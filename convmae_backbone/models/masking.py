"""Block-wise masking: everything ConvMAE pretraining does with the mask, in one place.

Convention everywhere: a mask is a (B, L) bool tensor over the stage-3 token grid (h, w) in raster order,
**True = masked**, with the same number of visible tokens in every row. One :class:`BlockMask` is made per
step from it and passed down the encoder; it carries the indices the decoder needs and moves stage-1/2
features between the two layouts the encoder runs on:

* dense: channels-last maps over the whole image, (B, h*S, w*S, C), where masked positions are zeroed right
  before every depthwise convolution (masked convolution, as the official code does);
* sparse: only the positions under visible tokens, (B, Lv, S, S, C), S = 4 at H/4, 2 at H/8, 1 at H/16.

Complementary masking (Fast ConvMAE) gives every image V masks, (B, V, L), whose visible sets are disjoint
(:func:`complementary_masks`); the V views of a batch form one :class:`BlockMask` of V*B rows, view-major
(row k*B + b is view k of image b, as in the official code), so the sparse layout holds every position of
every image once (:meth:`BlockMask.from_views`).

In training the mask is a function of the sample: the pipeline transform
:class:`~convmae_backbone.datasets.transforms.RandomBlockMask` draws it under the sample's seeded RNG, and
:func:`batch_masks` hands the batch's masks to the pretrainer. The convolutions that run on either layout are in
:mod:`.sparse_conv`.
"""
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor


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
    def from_views(cls, masks: Tensor, grid: Tuple[int, int], num_visible: Optional[int] = None) -> 'BlockMask':
        """The BlockMask of V views per image: masks (B, V, L) -> V*B rows, view-major (row k*B + b = view k of
        image b)."""
        if masks.dim() != 3:
            raise ValueError(f'view masks must have shape (B, V, L), got {tuple(masks.shape)}')
        return cls(masks.transpose(0, 1).reshape(-1, masks.shape[-1]), grid, num_visible)

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


def check_mask_ratio(mask_ratio: float) -> float:
    """``mask_ratio`` if it is in the open interval (0, 1), else ``ValueError`` naming it (0 leaves nothing to
    reconstruct: a NaN loss; 1 leaves nothing to encode)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f'mask_ratio must be in the open interval (0, 1), got {mask_ratio}')
    return mask_ratio


def num_visible_tokens(num_tokens: int, mask_ratio: float) -> int:
    """The number of visible tokens of an ``num_tokens`` grid under ``mask_ratio``: ``int(L * (1 - mask_ratio))``,
    the official rule. ``ValueError`` naming ``mask_ratio`` if that leaves no token visible or none masked."""
    num_visible = int(num_tokens * (1 - check_mask_ratio(mask_ratio)))
    if not 0 < num_visible < num_tokens:
        raise ValueError(f'mask_ratio={mask_ratio} leaves {num_visible} of {num_tokens} tokens visible; at least one '
                         f'must be visible and one masked')
    return num_visible


def random_mask(batch: int, num_tokens: int, mask_ratio: float, device=None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """(B, L) bool, True = masked, with exactly :func:`num_visible_tokens` visible tokens in every row."""
    num_visible = num_visible_tokens(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank >= num_visible


def num_views(mask_ratio: float) -> int:
    """Views of complementary masking at ``mask_ratio`` r: 1 / (1 - r) (4 at 0.75), which must be a whole
    number of at least 2, so that the views' visible sets can partition the grid."""
    views = round(1 / (1 - mask_ratio)) if mask_ratio < 1 else 0
    if views < 2 or abs(views * (1 - mask_ratio) - 1) > 1e-6:
        raise ValueError(f'complementary masking needs 1 / (1 - mask_ratio) to be a whole number >= 2 (e.g. '
                         f'mask_ratio 0.75 -> 4 views, 0.5 -> 2), got mask_ratio={mask_ratio}')
    return views


def complementary_masks(batch: int, num_tokens: int, mask_ratio: float, device=None,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """(B, V, L) bool, True = masked: V = :func:`num_views` masks per image with exactly
    :func:`num_visible_tokens` visible tokens each and pairwise disjoint visible sets.

    As in the official Fast ConvMAE: one random permutation of the grid per image, view k keeps the tokens at
    places k*Lv .. (k+1)*Lv - 1 of it (view 0 is :func:`random_mask` of the same draw). When V * Lv < L (a grid
    whose size V does not divide) the last L - V * Lv tokens of the permutation are masked in every view (the
    official code, written for 196 tokens, would give them to the last view)."""
    views = num_views(mask_ratio)
    num_visible = num_visible_tokens(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # place of every token in the permutation
    view_of = torch.div(rank, num_visible, rounding_mode='floor')  # >= V: visible in no view
    return view_of[:, None, :] != torch.arange(views, device=rank.device)[None, :, None]


class MaskStrategy(NamedTuple):
    """How a ``masking`` draws masks: ``draw(batch, num_tokens, mask_ratio, device, generator)`` -> (B, L) bool
    with one mask per image, or (B, V, L) with V = ``views(mask_ratio)`` > 1 masks per image; ``views`` raises
    ``ValueError`` for a mask ratio the strategy cannot use."""
    draw: Callable[..., Tensor]
    views: Callable[[float], int]


#: The masking strategies by name: the one table the pipeline transform (``RandomBlockMask``), the pretrainer
#: (``ConvMAEPretrainer(masking=...)``) and ``tools/benchmark.py`` read. ``block``: one block-wise mask per
#: image (ConvMAE); ``complementary``: V masks with disjoint visible sets (Fast ConvMAE).
MASKINGS: Dict[str, MaskStrategy] = {
    'block': MaskStrategy(random_mask, lambda mask_ratio: 1),
    'complementary': MaskStrategy(complementary_masks, num_views),
}


def mask_strategy(masking: str, mask_ratio: float) -> MaskStrategy:
    """The :data:`MASKINGS` entry ``masking``, checked against ``mask_ratio``; ``ValueError`` naming the choices
    or the ratio otherwise."""
    if masking not in MASKINGS:
        raise ValueError(f'masking must be one of {tuple(MASKINGS)}, got {masking!r}')
    strategy = MASKINGS[masking]
    strategy.views(mask_ratio)  # e.g. complementary: 1 / (1 - mask_ratio) must be a whole number
    return strategy


def upsample_mask(mask: Tensor, grid: Tuple[int, int], scale: int) -> Tensor:
    """(B, L) token mask on an (h, w) grid -> (B, 1, h*scale, w*scale): each token's value repeated in a block."""
    m = mask.reshape(mask.shape[0], 1, grid[0], grid[1])
    return m.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """(B, L, C) gathered at (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def batch_masks(data_samples: Optional[Sequence]) -> Optional[Tensor]:
    """The bool masks of a batch's data samples, stacked: (B, L), or (B, V, L) for complementary masks; None when
    they carry none."""
    if not data_samples:
        return None
    masks = [getattr(s, 'mask', None) if not isinstance(s, dict) else s.get('mask') for s in data_samples]
    if all(m is None for m in masks):
        return None
    if any(m is None for m in masks):
        raise ValueError('some data samples of the batch carry a mask and some do not')
    return torch.stack([torch.as_tensor(m) for m in masks]).bool()
