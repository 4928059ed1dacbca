"""The pretraining dataset: every image of a folder, for mmengine (labels are not used).

Unreadable files (truncated, corrupt or not an image at all) never stop a run: the loading transform
(:class:`~.transforms.SkipUnreadable`: ``LoadRGBImage``, ``DecodeRandomResizedCrop``) returns ``None`` with a
warning naming the file, and the dataset fetches another index instead (with :class:`~.samplers.SeededSampler`,
one drawn from the sample's seed).
"""
import logging
import os
import os.path as osp
from typing import List, Optional, Sequence, Tuple

import numpy as np
from mmengine.logging import print_log
from PIL import Image

from ..registry import register
from .samplers import SeededDataset


IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(root: str) -> List[str]:
    """All image files below ``root`` (recursive, following symlinks; extension match is case-insensitive), sorted.

    Every folder is walked once: a symlink leading to a folder already walked (a loop back to an ancestor, or a
    second link to one folder) is skipped with a warning naming it, so the walk ends whatever the links."""
    files = []
    visited = {_folder_id(root)} if osp.isdir(root) else set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(sorted(dirnames), key=lambda d: osp.islink(osp.join(dirpath, d))):  # real folders first
            path = osp.join(dirpath, name)
            try:
                folder = _folder_id(path)
            except OSError:  # gone since it was listed: os.walk would skip it too
                continue
            if folder in visited:
                print_log(f'skipped {path!r}: it leads to {osp.realpath(path)!r}, a folder already walked (a '
                          f'symlink loop or a second link to one folder)', logger='current', level=logging.WARNING)
                continue
            visited.add(folder)
            kept.append(name)
        dirnames[:] = sorted(kept)
        files.extend(osp.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return files


def _folder_id(path: str) -> Tuple[int, int]:
    """(device, inode) of the folder ``path`` leads to."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


#: Pixels converted at once by :func:`to_rgb8` from 16-bit, 32-bit and float images (bounds its float64 work).
CONVERT_PIXELS = 1 << 16


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any PIL image (grayscale, RGBA, palette, CMYK, 16-bit or float grayscale) to 8-bit RGB.

    16-bit, 32-bit and float grayscale is scaled to 0..255 (65535 -> 255; floats in [0, 1] -> 255) in bands of
    about :data:`CONVERT_PIXELS` pixels, so that beyond the source image it costs the 8-bit gray and RGB images and
    no full-size copy."""
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
        if img.mode.startswith('I;16') or (img.mode == 'I' and max(img.getextrema()[1], 0) > 255):
            scale = 1 / 257  # 0..65535 -> 0..255
        elif img.mode == 'F' and max(img.getextrema()[1], 0) <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        width, height = img.size
        gray = np.empty((height, width), np.uint8)
        rows = max(1, CONVERT_PIXELS // max(1, width))
        for top in range(0, height, rows):
            band = np.asarray(img.crop((0, top, width, min(top + rows, height))), dtype=np.float64)
            gray[top:top + rows] = np.clip(np.rint(band * scale), 0, 255)
        img = Image.fromarray(gray)  # 2-D uint8 -> mode 'L'
    elif img.mode in ('P', 'PA'):
        img = img.convert('RGBA')
    return img.convert('RGB')


def image_dir(data_root: Optional[str], subdir: Optional[str] = 'train') -> str:
    """The folder :class:`ImageFolderDataset` reads: ``data_root/subdir`` when that exists, else ``data_root``."""
    root = data_root or ''
    if subdir and osp.isdir(osp.join(root, subdir)):
        return osp.join(root, subdir)
    return root


def find_images(folder: str) -> List[str]:
    """:func:`list_images` of ``folder``; ``FileNotFoundError`` naming it when it is missing or holds no image."""
    if not folder or not osp.isdir(folder):
        raise FileNotFoundError(f'image folder {folder!r} does not exist (set train_dataloader.dataset.data_root to '
                                f'a folder of images)')
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f'image folder {folder!r} holds no images with extensions {IMG_EXTENSIONS}')
    return files


@register('DATASETS')
class ImageFolderDataset(SeededDataset):
    """Every image below ``data_root/subdir`` (when that folder exists) or else below ``data_root``, recursively.

    Works for ImageNet-style ``train/<class>/*.JPEG`` trees and for flat folders; labels are not used.
    A missing or empty folder raises ``FileNotFoundError`` naming the path when the dataset is built.
    """

    def __init__(self, data_root: str = '', subdir: Optional[str] = 'train', pipeline: Sequence = (), **kwargs):
        self.subdir = subdir
        super().__init__(data_root=data_root, pipeline=list(pipeline), **kwargs)

    @property
    def image_dir(self) -> str:
        return image_dir(self.data_root, self.subdir)

    def load_data_list(self) -> List[dict]:
        root = self.image_dir
        files = find_images(root)
        print_log(f'ImageFolderDataset: {len(files)} images under {root}', logger='current')
        return [dict(img_path=f) for f in files]

    @property
    def source(self) -> str:
        return self.image_dir
