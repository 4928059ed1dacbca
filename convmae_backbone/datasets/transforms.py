"""The MAE pretraining pipeline (RandomResizedCrop + flip + block mask), for mmengine.

The pipeline yields ``dict(inputs=uint8 tensor (3, H, W))`` (and ``data_samples`` carrying the mask), which
:func:`mae_collate` batches; normalisation (ImageNet mean and std, RGB) is done by the model's
``ImgDataPreprocessor``.

The transforms are mmcv ``BaseTransform`` s in mmengine's root TRANSFORMS registry, so that configs of any
``default_scope`` (mmengine, mmdet, mmseg) find them. Under :class:`~.samplers.SeededSampler` they draw from the
sample's seeded RNGs.
"""
import io
import logging
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine import fileio
from mmengine.dataset import default_collate
from mmengine.logging import print_log
from mmengine.structures import BaseDataElement
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from ..models.masking import complementary_masks, num_views, num_visible_tokens, random_mask
from ..registry import register
from .decode import DECODERS, EncodedImage, reduced_size
from .image_folder import to_rgb8


def read_image_bytes(results: dict, backend_args: Optional[dict] = None) -> bytes:
    """The encoded image of a sample: ``results['img_bytes']`` (e.g. from tar shards) or the file at
    ``results['img_path']``, read through mmengine's file backends (local paths, ``backend_args``).
    ``ValueError`` with ``results['img_error']`` when the dataset found the sample unreadable (a damaged tar
    member)."""
    if results.get('img_error'):
        raise ValueError(results['img_error'])
    data = results.get('img_bytes')
    return data if data is not None else fileio.get(results['img_path'], backend_args=backend_args)


class SkipUnreadable(BaseTransform):
    """Base of the loading transforms: :meth:`load` returning ``None`` (mmengine's ``BaseDataset`` then draws
    another index) for a file that cannot be read or decoded, with one warning per bad file naming it and the
    number of bad files found so far by this process."""

    bad_files: set = set()  # per process, shared by every loading transform

    @classmethod
    def num_skipped(cls) -> int:
        return len(SkipUnreadable.bad_files)

    def load(self, results: dict) -> dict:
        raise NotImplementedError

    def transform(self, results: dict) -> Optional[dict]:
        name = results.get('img_path')  # names the sample; without it (bytes only) nothing is remembered
        if name in SkipUnreadable.bad_files:
            return None
        try:
            return self.load(results)
        except Exception as exc:  # noqa: BLE001 - any reading or decoding failure means: skip this file
            if name is not None:
                SkipUnreadable.bad_files.add(name)
            print_log(f'skipped unreadable image {name or "(bytes)"!r} ({type(exc).__name__}: {exc}); '
                      f'{len(SkipUnreadable.bad_files)} bad file(s) skipped so far', logger='current',
                      level=logging.WARNING)
            return None


@register('TRANSFORMS')
class LoadRGBImage(SkipUnreadable):
    """Read ``results['img_path']`` (or ``results['img_bytes']``) as an 8-bit RGB PIL image into
    ``results['img']``; unreadable files are skipped (:class:`SkipUnreadable`)."""

    def __init__(self, backend_args: Optional[dict] = None):
        self.backend_args = backend_args

    def load(self, results: dict) -> dict:
        with Image.open(io.BytesIO(read_image_bytes(results, self.backend_args))) as img:
            img.load()  # decode now so truncated files fail here
            results['img'] = to_rgb8(img)
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


def draw_crop(height: int, width: int, scale: Sequence[float], ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of a ``height`` x ``width`` image: the draws of torchvision's
    ``RandomResizedCrop.get_params`` (the same calls on torch's global RNG, so the same boxes for the same RNG
    state; tested), from the size alone and without its per-call API logging and image checks, which cost
    more than the draws.

    Up to 10 attempts: area fraction uniform in ``scale``, log aspect ratio (w / h) uniform in log ``ratio``,
    kept if the box fits, placed uniformly; else the largest centred box with the aspect ratio clamped to
    ``ratio``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            return top, int(torch.randint(0, width - w + 1, size=(1,)).item()), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@register('TRANSFORMS')
class DecodeRandomResizedCrop(SkipUnreadable):
    """Load + RandomResizedCrop in one step, doing only the work the crop needs; same crop distribution and
    the same random draws as ``LoadRGBImage`` + :class:`MAERandomResizedCrop`.

    1. the crop (top, left, height, width) is drawn from the size in the header (:func:`draw_crop`:
       torchvision's ``RandomResizedCrop.get_params``, torch's global RNG, which :class:`~.samplers.SeededSampler`
       seeds per sample);
    2. a JPEG is decoded at 1/f of its size (DCT scaling, :class:`~.decode.EncodedImage`) with the largest f
       in (1, 2, 4, 8) that keeps the crop at least ``size`` (so the resize still only shrinks or keeps it);
    3. the crop (in the reduced image: its box divided by f, rounded to whole pixels) is resized to ``size``
       by torch's antialiased ``interpolate`` on uint8 (bicubic: PIL's filter, a = -0.5, with its support
       widened when shrinking), without a float copy of the image.

    ``results['img_bytes']`` or the file ``results['img_path']`` (mmengine file backends, ``backend_args``) ->
    ``results['img']``: uint8 numpy array (H, W, 3) RGB; also ``ori_shape`` (height, width of the image),
    ``img_shape``, ``crop_box`` (top, left, height, width of the region used, in pixels of the full image) and
    ``decode_factor`` (f). Unreadable files are skipped (:class:`SkipUnreadable`).
    """

    def __init__(self, size: Union[int, Sequence[int]] = 224, scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = 'bicubic',
                 decoder: str = 'simplejpeg', reduced_decoding: bool = True, backend_args: Optional[dict] = None):
        if interpolation not in ('bicubic', 'bilinear'):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear' (antialiased), got {interpolation!r}")
        if not (0 < scale[0] <= scale[1] <= 1.0 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f'need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got scale={scale}, '
                             f'ratio={ratio}')
        if decoder not in DECODERS:
            raise ValueError(f'decoder must be one of {DECODERS}, got {decoder!r}')
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation, self.decoder = interpolation, decoder
        self.reduced_decoding, self.backend_args = reduced_decoding, backend_args

    def plan(self, height: int, width: int, factors: Sequence[int] = (1,)
             ) -> Tuple[int, Tuple[int, int, int, int], Tuple[int, int, int, int]]:
        """Draw the crop of a ``height`` x ``width`` image whose decoder offers the reduction ``factors``:
        (f, (y0, x0, y1, x1) the crop in the image reduced by f, (top, left, height, width) the same region in
        full-image pixels)."""
        top, left, crop_h, crop_w = draw_crop(height, width, self.scale, self.ratio)
        factor = max((f for f in factors if crop_h >= f * self.size[0] and crop_w >= f * self.size[1]),
                     default=1) if self.reduced_decoding else 1
        small_h, small_w = reduced_size(height, width, factor)
        y0, x0 = int(top / factor + 0.5), int(left / factor + 0.5)  # rounded to whole pixels (exact for f = 1)
        y1 = min(max(int((top + crop_h) / factor + 0.5), y0 + 1), small_h)
        x1 = min(max(int((left + crop_w) / factor + 0.5), x0 + 1), small_w)
        top, left = y0 * factor, x0 * factor
        return factor, (y0, x0, y1, x1), (top, left, min(y1 * factor, height) - top, min(x1 * factor, width) - left)

    def load(self, results: dict) -> dict:
        image = EncodedImage(read_image_bytes(results, self.backend_args), self.decoder)
        factor, (y0, x0, y1, x1), box = self.plan(*image.size, image.factors)
        crop = torch.from_numpy(image.decode(factor)[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w)
        out = F.interpolate(crop, size=self.size, mode=self.interpolation, antialias=True, align_corners=False)
        results['img'] = out[0].permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        results.update(ori_shape=image.size, img_shape=self.size, decode_factor=factor, crop_box=box)
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, '
                f'interpolation={self.interpolation!r}, decoder={self.decoder!r}, '
                f'reduced_decoding={self.reduced_decoding})')


@register('TRANSFORMS')
class MAERandomFlip(BaseTransform):
    """Horizontal flip of a PIL image or a numpy array (H, W[, C]) with probability ``prob`` (torch's global
    RNG)."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def transform(self, results: dict) -> dict:
        if torch.rand(1).item() < self.prob:
            img = results['img']
            results['img'] = img[:, ::-1] if isinstance(img, np.ndarray) else TF.hflip(img)
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}(prob={self.prob})'


@register('TRANSFORMS')
class PackMAEInputs(BaseTransform):
    """RGB PIL image or uint8 numpy array (H, W, 3) -> ``dict(inputs=uint8 tensor (3, H, W))``, plus
    ``data_samples`` holding the sample's mask when the pipeline drew one (:class:`RandomBlockMask`)."""

    def transform(self, results: dict) -> dict:
        arr = np.asarray(results['img'], dtype=np.uint8)  # (H, W, 3), possibly a (flipped) view of (3, H, W)
        packed = dict(inputs=torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))  # one copy
        return pack_mask(results, packed)  # + data_samples with the sample's mask (RandomBlockMask), if any

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


@register('TRANSFORMS')
class RandomBlockMask(BaseTransform):
    """Draw ``results['mask']``: (L,) bool, True = masked, over the (input / patch) token grid, with exactly
    :func:`~convmae_backbone.models.masking.num_visible_tokens` visible tokens (``int(L * (1 - mask_ratio))``);
    with ``masking='complementary'`` (Fast ConvMAE) V = 1 / (1 - mask_ratio) such masks, (V, L), whose visible
    tokens are disjoint (:func:`~convmae_backbone.models.masking.complementary_masks`).

    ``results['img']`` is a PIL image or a numpy array (H, W[, C]) (mmcv's ``LoadImageFromFile``); its size must
    be ``input_size``. Uses torch's global RNG, which :class:`~.samplers.SeededSampler` seeds per sample. Place it
    after the crop, before ``PackMAEInputs``. ``input_size``, ``mask_ratio`` and ``masking`` must match the
    model's ``img_size``, ``mask_ratio`` and ``masking`` (the model checks the masks' shape and visible tokens).
    """

    MASKINGS = ('block', 'complementary')

    def __init__(self, input_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, mask_ratio: float = 0.75,
                 masking: str = 'block'):
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or size[0] % patch_size or size[1] % patch_size or min(size) <= 0:
            raise ValueError(f'input_size {input_size} must be positive multiples of patch_size {patch_size}')
        self.grid: Tuple[int, int] = (size[0] // patch_size, size[1] // patch_size)
        num_visible_tokens(self.grid[0] * self.grid[1], mask_ratio)  # refuses a ratio outside (0, 1) here
        if masking not in self.MASKINGS:
            raise ValueError(f'masking must be one of {self.MASKINGS}, got {masking!r}')
        if masking == 'complementary':
            num_views(mask_ratio)  # raises unless 1 / (1 - mask_ratio) is a whole number
        self.input_size, self.patch_size, self.mask_ratio = size, patch_size, mask_ratio
        self.masking = masking

    def transform(self, results: dict) -> dict:
        img = results.get('img')
        if img is not None and image_hw(img) != self.input_size:
            raise ValueError(f'RandomBlockMask expects {self.input_size} images (put it after the crop), got '
                             f'{image_hw(img)}')
        draw = complementary_masks if self.masking == 'complementary' else random_mask
        results['mask'] = draw(1, self.grid[0] * self.grid[1], self.mask_ratio)[0]
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(input_size={self.input_size}, patch_size={self.patch_size}, '
                f'mask_ratio={self.mask_ratio}, masking={self.masking!r})')


def image_hw(img: Union[Image.Image, np.ndarray]) -> Tuple[int, int]:
    """(height, width) of a PIL image or of a numpy array (H, W[, C]); ``TypeError`` naming any other type."""
    if isinstance(img, Image.Image):
        return img.size[1], img.size[0]
    if isinstance(img, np.ndarray) and img.ndim in (2, 3):
        return int(img.shape[0]), int(img.shape[1])
    raise TypeError(f'expected a PIL image or a numpy array (H, W[, C]), got {type(img).__name__}'
                    f'{tuple(img.shape) if hasattr(img, "shape") else ""}')


def pack_mask(results: dict, packed: dict) -> dict:
    """Add ``data_samples=BaseDataElement(mask=(L,) bool)`` to ``packed`` when ``results`` holds a mask."""
    if 'mask' in results:
        packed['data_samples'] = BaseDataElement(mask=results['mask'])
    return packed


@register('FUNCTIONS')
def mae_collate(data_batch: Sequence[dict]) -> dict:
    """The pretraining batch: mmengine's ``default_collate`` (the images stacked into one (B, 3, H, W) tensor where
    the loader runs), and the data samples' masks stacked into one (B, L) (or (B, V, L)) tensor whose rows the
    samples then hold. A batch leaves a loader worker as two tensors: every tensor crossing from a worker is a
    shared-memory segment of its own that the main process maps, which with per-sample tensors limited the
    loader (docs/benchmark.md, input pipeline)."""
    batch = default_collate(data_batch)
    samples = batch.get('data_samples') if isinstance(batch, dict) else None
    if samples and all(isinstance(s, BaseDataElement) and 'mask' in s for s in samples):
        for sample, row in zip(samples, torch.stack([torch.as_tensor(s.mask) for s in samples])):
            sample.mask = row
    return batch
