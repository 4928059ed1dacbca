"""Image-folder dataset and the MAE pretraining pipeline (RandomResizedCrop + flip), for mmengine.

The pipeline yields ``dict(inputs=uint8 tensor (3, H, W))``; normalisation (ImageNet mean
and std, RGB) is done by the model's ``ImgDataPreprocessor``. Unreadable files (truncated, corrupt or not an
image at all) never stop a run: the loader returns ``None`` with a warning naming the file, and mmengine's
``BaseDataset`` fetches another index instead.

The transforms are mmcv ``BaseTransform`` s in mmengine's root TRANSFORMS registry, so that configs of any
``default_scope`` (mmengine, mmdet, mmseg) find them.

With :class:`SeededSampler` every sample's augmentation is a pure function of (run seed, epoch, index): the
same crops and flips whatever ``num_workers`` is, and again after ``--resume``.
"""
import logging
import os
import os.path as osp
import random
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.dataset import BaseDataset, DefaultSampler
from mmengine.logging import print_log
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from .models.masking import pack_mask

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(root: str) -> List[str]:
    """All image files below ``root`` (recursive, extension match is case-insensitive), sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files.extend(osp.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return files


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any PIL image (grayscale, RGBA, palette, CMYK, 16-bit or float grayscale) to 8-bit RGB."""
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith('I;16') or (img.mode == 'I' and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == 'F' and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode 'L'
    elif img.mode in ('P', 'PA'):
        img = img.convert('RGBA')
    return img.convert('RGB')


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


class PackMAEInputs(BaseTransform):
    """PIL RGB image -> ``dict(inputs=uint8 tensor (3, H, W))``, plus ``data_samples`` holding the sample's
    mask when the pipeline drew one (:class:`~convmae_backbone.models.masking.RandomBlockMask`)."""

    def transform(self, results: dict) -> dict:
        arr = np.asarray(results['img'], dtype=np.uint8)  # (H, W, 3)
        packed = dict(inputs=torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
        return pack_mask(results, packed)  # + data_samples with the sample's mask (RandomBlockMask), if any

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


class ImageFolderDataset(BaseDataset):
    """Every image below ``data_root/subdir`` (when that folder exists) or else below ``data_root``, recursively.

    Works for ImageNet-style ``train/<class>/*.JPEG`` trees and for flat folders; labels are not used.
    A missing or empty folder raises ``FileNotFoundError`` naming the path when the dataset is built.
    """

    def __init__(self, data_root: str = '', subdir: Optional[str] = 'train', pipeline: Sequence = (), **kwargs):
        self.subdir = subdir
        super().__init__(data_root=data_root, pipeline=list(pipeline), **kwargs)

    @property
    def image_dir(self) -> str:
        root = self.data_root or ''
        if self.subdir and osp.isdir(osp.join(root, self.subdir)):
            return osp.join(root, self.subdir)
        return root

    def load_data_list(self) -> List[dict]:
        root = self.image_dir
        if not root or not osp.isdir(root):
            raise FileNotFoundError(f'image folder {root!r} does not exist (set train_dataloader.dataset.'
                                    f'data_root to a folder of images)')
        files = list_images(root)
        if not files:
            raise FileNotFoundError(f'image folder {root!r} holds no images with extensions {IMG_EXTENSIONS}')
        print_log(f'ImageFolderDataset: {len(files)} images under {root}', logger='current')
        return [dict(img_path=f) for f in files]

    def __getitem__(self, index: Union[int, Tuple[int, int]]) -> dict:
        """``index`` is an int (mmengine's samplers) or ``(index, sample_seed)`` (:class:`SeededSampler`).

        With a seed, the pipeline runs under Python, numpy and torch RNGs seeded with it (the caller's RNG state
        is left untouched) and an unreadable image is replaced by an index drawn from the same seed.
        """
        if not isinstance(index, (tuple, list)):
            return super().__getitem__(index)
        idx, seed = int(index[0]), int(index[1])
        if not self._fully_initialized:
            self.full_init()
        replacement = np.random.default_rng(seed)
        for _ in range(self.max_refetch + 1):
            with seeded_rngs(seed):
                data = self.prepare_data(idx)
            if data is not None:
                return data
            idx = int(replacement.integers(len(self)))
        raise RuntimeError(f'no readable image found after {self.max_refetch} attempts under {self.image_dir}')


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed ``random``, numpy's global RNG and torch's CPU RNG with ``seed``; restore their states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSampler(DefaultSampler):
    """mmengine's ``DefaultSampler`` (same order, shuffling and DDP split) yielding ``(index, sample_seed)``
    with ``sample_seed`` derived from (seed, epoch, index), for :class:`ImageFolderDataset`."""

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for idx in super().__iter__():
            yield idx, int(np.random.SeedSequence([self.seed, self.epoch, idx]).generate_state(1)[0])
