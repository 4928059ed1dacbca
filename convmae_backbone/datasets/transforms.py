"""The MAE pretraining pipeline (RandomResizedCrop + flip + block mask), for mmengine.

The pipeline yields ``dict(inputs=uint8 tensor (3, H, W))`` (and ``data_samples`` carrying the mask); normalisation
(ImageNet mean and std, RGB) is done by the model's ``ImgDataPreprocessor``.

The transforms are mmcv ``BaseTransform`` s in mmengine's root TRANSFORMS registry, so that configs of any
``default_scope`` (mmengine, mmdet, mmseg) find them. Under :class:`~.samplers.SeededSampler` they draw from the
sample's seeded RNGs.
"""
import logging
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.logging import print_log
from mmengine.structures import BaseDataElement
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from ..models.masking import complementary_masks, num_views, random_mask
from ..registry import register
from .image_folder import to_rgb8


@register('TRANSFORMS')
class LoadRGBImage(BaseTransform):
    """Read ``results['img_path']`` as an 8-bit RGB PIL image into ``results['img']``.

    Returns ``None`` (mmengine's ``BaseDataset`` then draws another index) for a file that cannot be decoded,
    with one warning per bad file naming it and the number of bad files found so far by this process.
    """

    bad_files: set = set()  # per process

    @classmethod
    def num_skipped(cls) -> int:
        return len(cls.bad_files)

    def transform(self, results: dict) -> Optional[dict]:
        path = results['img_path']
        if path in LoadRGBImage.bad_files:
            return None
        try:
            with Image.open(path) as img:
                img.load()  # decode now so truncated files fail here
                results['img'] = to_rgb8(img)
        except Exception as exc:  # noqa: BLE001 - any decoding failure means: skip this file
            LoadRGBImage.bad_files.add(path)
            print_log(f'skipped unreadable image {path!r} ({type(exc).__name__}: {exc}); '
                      f'{len(LoadRGBImage.bad_files)} bad file(s) skipped so far', logger='current',
                      level=logging.WARNING)
            return None
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


@register('TRANSFORMS')
class MAERandomResizedCrop(BaseTransform):
    """RandomResizedCrop of a PIL image (torchvision parameters, bicubic by default) to ``size``.

    Small images are upsampled, as in torchvision.
    """

    def __init__(self, size=224, scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = 'bicubic'):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = InterpolationMode(interpolation)

    def transform(self, results: dict) -> dict:
        img = results['img']
        i, j, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        results['img'] = TF.resized_crop(img, i, j, h, w, list(self.size), self.interpolation)
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})'


@register('TRANSFORMS')
class MAERandomFlip(BaseTransform):
    """Horizontal flip of a PIL image with probability ``prob`` (torch's global RNG)."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def transform(self, results: dict) -> dict:
        if torch.rand(1).item() < self.prob:
            results['img'] = TF.hflip(results['img'])
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}(prob={self.prob})'


@register('TRANSFORMS')
class PackMAEInputs(BaseTransform):
    """PIL RGB image -> ``dict(inputs=uint8 tensor (3, H, W))``, plus ``data_samples`` holding the sample's
    mask when the pipeline drew one (:class:`RandomBlockMask`)."""

    def transform(self, results: dict) -> dict:
        arr = np.asarray(results['img'], dtype=np.uint8)  # (H, W, 3)
        packed = dict(inputs=torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
        return pack_mask(results, packed)  # + data_samples with the sample's mask (RandomBlockMask), if any

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


@register('TRANSFORMS')
class RandomBlockMask(BaseTransform):
    """Draw ``results['mask']``: (L,) bool, True = masked, over the (input / patch) token grid, with exactly
    ``int(L * (1 - mask_ratio))`` visible tokens (the rule of :func:`~convmae_backbone.models.masking.random_mask`);
    with ``masking='complementary'`` (Fast ConvMAE) V = 1 / (1 - mask_ratio) such masks, (V, L), whose visible
    tokens are disjoint (:func:`~convmae_backbone.models.masking.complementary_masks`).

    Uses torch's global RNG, which :class:`~.samplers.SeededSampler` seeds per sample. Place it
    after the crop, before ``PackMAEInputs``. ``input_size``, ``mask_ratio`` and ``masking`` must match the
    model's ``img_size``, ``mask_ratio`` and ``masking`` (the model checks the masks' shape and visible tokens).
    """

    MASKINGS = ('block', 'complementary')

    def __init__(self, input_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, mask_ratio: float = 0.75,
                 masking: str = 'block'):
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or size[0] % patch_size or size[1] % patch_size or min(size) <= 0:
            raise ValueError(f'input_size {input_size} must be positive multiples of patch_size {patch_size}')
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        if masking not in self.MASKINGS:
            raise ValueError(f'masking must be one of {self.MASKINGS}, got {masking!r}')
        if masking == 'complementary':
            num_views(mask_ratio)  # raises unless 1 / (1 - mask_ratio) is a whole number
        self.grid: Tuple[int, int] = (size[0] // patch_size, size[1] // patch_size)
        self.input_size, self.patch_size, self.mask_ratio = size, patch_size, mask_ratio
        self.masking = masking

    def transform(self, results: dict) -> dict:
        img = results.get('img')
        if img is not None and hasattr(img, 'size') and not callable(img.size):  # PIL: (W, H)
            if tuple(img.size[::-1]) != self.input_size:
                raise ValueError(f'RandomBlockMask expects {self.input_size} images (put it after the crop), got '
                                 f'{tuple(img.size[::-1])}')
        draw = complementary_masks if self.masking == 'complementary' else random_mask
        results['mask'] = draw(1, self.grid[0] * self.grid[1], self.mask_ratio)[0]
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(input_size={self.input_size}, patch_size={self.patch_size}, '
                f'mask_ratio={self.mask_ratio}, masking={self.masking!r})')


def pack_mask(results: dict, packed: dict) -> dict:
    """Add ``data_samples=BaseDataElement(mask=(L,) bool)`` to ``packed`` when ``results`` holds a mask."""
    if 'mask' in results:
        packed['data_samples'] = BaseDataElement(mask=results['mask'])
    return packed
