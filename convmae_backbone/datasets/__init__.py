from .image_folder import ImageFolderDataset, list_images, to_rgb8
from .samplers import SeededSampler
from .transforms import (DecodeRandomResizedCrop, LoadRGBImage, MAERandomFlip, MAERandomResizedCrop, PackMAEInputs,
                         RandomBlockMask, SkipUnreadable)

__all__ = ['ImageFolderDataset', 'SeededSampler', 'LoadRGBImage', 'DecodeRandomResizedCrop', 'SkipUnreadable',
           'MAERandomResizedCrop', 'MAERandomFlip',
           'PackMAEInputs', 'RandomBlockMask', 'list_images', 'to_rgb8']
