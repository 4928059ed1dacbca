"""Pretraining masks as a function of the sample.

:class:`RandomBlockMask` is a pipeline transform that draws one sample's (L,) token mask from the RNG the
pipeline runs under. With :class:`~convmae_backbone.data.SeededSampler` that RNG is seeded per sample from
(run seed, epoch, index), so the mask, like the crop and the flip, is a pure function of the sample: the same on
1 or on 8 processes, with any ``num_workers`` and after ``--resume``. :func:`pack_mask` puts it into the data
sample (an mmengine ``BaseDataElement`` with a ``mask`` field) that ``ConvMAEPretrainer.forward`` reads;
:func:`batch_masks` stacks a batch's masks.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from mmcv.transforms import BaseTransform
from mmengine.structures import BaseDataElement
from torch import Tensor


class RandomBlockMask(BaseTransform):
    """Draw ``results['mask']``: (L,) bool, True = masked, over the (input / patch) token grid, with exactly
    ``int(L * (1 - mask_ratio))`` visible tokens (the rule of :func:`~.models.masking.random_mask`).

    Uses torch's global RNG, which :class:`~convmae_backbone.data.SeededSampler` seeds per sample. Place it
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
        from .models.masking import random_mask  # here: the models package imports this module
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
