"""Decoding an encoded image at full or reduced size, its size known from the header before any pixel work.

JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` (the default) or PIL; both can scale the inverse DCT by
1/2, 1/4 or 1/8 ("reduced decoding"), which costs a fraction of a full decode. At full size both give the same
pixels (they share libjpeg-turbo's default integer DCT and fancy upsampling); ``simplejpeg`` hands back a numpy
array without PIL's image object and copy. Everything else (PNG, WebP, TIFF, CMYK JPEGs, 16-bit images...) is
decoded in full by PIL and converted to 8-bit RGB by :func:`~.image_folder.to_rgb8`.

The decompression-bomb limit is PIL's (``Image.MAX_IMAGE_PIXELS``; twice that is refused) for both decoders.
"""
import io
from typing import Optional, Tuple

import numpy as np
import simplejpeg
from PIL import Image

from .image_folder import to_rgb8

#: JPEG decoders of :class:`EncodedImage`.
DECODERS = ('simplejpeg', 'pil')
#: Reduction factors of JPEG DCT scaling that both decoders support (pixel k of the reduced image covers
#: pixels [f k, f k + f) of the full one).
DCT_FACTORS = (1, 2, 4, 8)
_JPEG_MAGIC = b'\xff\xd8\xff'
_SIMPLEJPEG_COLORSPACES = ('Gray', 'YCbCr', 'RGB')  # what libjpeg-turbo converts to RGB itself (not CMYK/YCCK)


def reduced_size(height: int, width: int, factor: int) -> Tuple[int, int]:
    """(height, width) of an image decoded with DCT scaling by 1/``factor`` (libjpeg rounds up)."""
    return -(-height // factor), -(-width // factor)


class EncodedImage:
    """An encoded image whose ``(height, width)`` is read from the header; :meth:`decode` decodes it.

    Raises (``ValueError``, ``OSError``, PIL's ``UnidentifiedImageError`` / ``DecompressionBombError``) for data
    that is not a readable image, naming the cause.
    """

    def __init__(self, data: bytes, decoder: str = 'simplejpeg'):
        if decoder not in DECODERS:
            raise ValueError(f'decoder must be one of {DECODERS}, got {decoder!r}')
        self.data = data
        self._pil: Optional[Image.Image] = None
        self.jpeg = data[:3] == _JPEG_MAGIC
        if self.jpeg and decoder == 'simplejpeg':
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in _SIMPLEJPEG_COLORSPACES:
                if height * width > 2 * (Image.MAX_IMAGE_PIXELS or float('inf')):
                    raise Image.DecompressionBombError(
                        f'image size ({width}x{height} pixels) exceeds twice PIL\'s limit of '
                        f'{Image.MAX_IMAGE_PIXELS} pixels (Image.MAX_IMAGE_PIXELS)')
                self.size = (height, width)
                return
        self._pil = Image.open(io.BytesIO(data))  # header only; checks MAX_IMAGE_PIXELS
        self.jpeg = self.jpeg and self._pil.format == 'JPEG' and self._pil.mode in ('RGB', 'L')
        self.size = (self._pil.height, self._pil.width)

    @property
    def factors(self) -> Tuple[int, ...]:
        """The reduction factors :meth:`decode` accepts: :data:`DCT_FACTORS` for an RGB or gray JPEG, else (1,)."""
        return DCT_FACTORS if self.jpeg else (1,)

    def decode(self, factor: int = 1) -> np.ndarray:
        """Pixels as uint8 (H / factor, W / factor, 3) RGB (rounded up), JPEGs with DCT scaling by 1/``factor``."""
        if factor not in self.factors:
            raise ValueError(f'reduction factor {factor} not available for this image (possible: {self.factors})')
        height, width = reduced_size(*self.size, factor)
        if self._pil is None:
            arr = simplejpeg.decode_jpeg(self.data, 'RGB', min_height=height, min_width=width)
        else:
            img = self._pil
            if factor > 1:
                img.draft('RGB', (self.size[1] // factor, self.size[0] // factor))
            img.load()
            arr = np.array(to_rgb8(img))
        if arr.shape != (height, width, 3):  # a decoder choosing another scale would shift every crop
            raise ValueError(f'decoded {arr.shape} for reduction {factor} of a {self.size} image, expected '
                             f'{(height, width, 3)}')
        return arr
