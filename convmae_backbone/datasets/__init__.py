from .image_folder import ImageFolderDataset, list_images, to_rgb8
from .samplers import SeededDataset, SeededSampler
from .shards import ShardError, ShardNotFoundError, TarShardDataset, expand_shards, write_shards
from .transforms import (DecodeRandomResizedCrop, LoadRGBImage, MAERandomFlip, MAERandomResizedCrop, PackMAEInputs,
                         RandomBlockMask, SkipUnreadable)

__all__ = ['ImageFolderDataset', 'TarShardDataset', 'ShardError', 'ShardNotFoundError', 'SeededDataset',
           'SeededSampler', 'expand_shards', 'write_shards', 'LoadRGBImage', 'DecodeRandomResizedCrop',
           'SkipUnreadable', 'MAERandomResizedCrop', 'MAERandomFlip', 'PackMAEInputs', 'RandomBlockMask',
           'list_images', 'to_rgb8']
