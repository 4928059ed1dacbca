from .image_folder import ImageFolderDataset, list_images, to_rgb8
from .samplers import SeededSampler
from .transforms import LoadRGBImage, MAERandomFlip, MAERandomResizedCrop, PackMAEInputs, RandomBlockMask

__all__ = ['ImageFolderDataset', 'SeededSampler', 'LoadRGBImage', 'MAERandomResizedCrop', 'MAERandomFlip',
           'PackMAEInputs', 'RandomBlockMask', 'list_images', 'to_rgb8']
