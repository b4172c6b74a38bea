"""Image decoding with the crop done before the resize.

Fast path: JPEG through simplejpeg (libjpeg-turbo, SIMD), decoded at 1/2, 1/4 or 1/8 scale when the crop
is at least twice the output size (the JPEG "draft" trick: the IDCT does the downscale almost for free).
Everything else, and any JPEG that simplejpeg refuses (CMYK, odd markers), goes through Pillow, which also
uses draft mode for JPEGs. Only the crop box is resampled: Pillow's `resize(box=...)` reads just that region.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # Pillow alone still works, only slower
    simplejpeg = None

DECODERS = ("simplejpeg", "pillow")
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
JPEG_MAGIC = b"\xff\xd8"

# (width, height) of the source -> crop box (left, top, right, bottom) in source pixels
BoxFn = Callable[[int, int], tuple[float, float, float, float]]


def _draft_factor(box, out_size: tuple[int, int]) -> int:
    """Largest power-of-two downscale (<= 8) that keeps the crop at least as large as the output."""
    scale = min((box[2] - box[0]) / out_size[0], (box[3] - box[1]) / out_size[1])
    return 1 if scale < 2 else min(8, 2 ** int(math.log2(scale)))


def _resize_box(img: Image.Image, box, src_size, out_size, resample) -> Image.Image:
    sx, sy = img.size[0] / src_size[0], img.size[1] / src_size[1]
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return img.resize(out_size, resample, box=box)


def _decode_simplejpeg(data: bytes, box_fn: BoxFn, out_size, resample) -> Image.Image:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    box = box_fn(width, height)
    f = _draft_factor(box, out_size)
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height / f),
                                 min_width=math.ceil(width / f))
    return _resize_box(Image.fromarray(arr), box, (width, height), out_size, resample)


def _decode_pillow(data: bytes, box_fn: BoxFn, out_size, resample) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    src_size = img.size
    box = box_fn(*src_size)
    f = _draft_factor(box, out_size)
    if f > 1 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(src_size[0] / f), math.ceil(src_size[1] / f)))
    return _resize_box(img.convert("RGB"), box, src_size, out_size, resample)


def decode_crop_resize(data: bytes, box_fn: BoxFn, out_size: tuple[int, int], *,
                       interpolation: str = "bilinear", decoder: str = "simplejpeg") -> Image.Image:
    """Decode `data`, crop `box_fn(width, height)` and resize it to `out_size` (w, h): an RGB PIL image.

    Raises on undecodable data; the caller counts and skips the sample.
    """
    resample = INTERPOLATIONS[interpolation]
    if decoder == "simplejpeg" and simplejpeg is not None and data[:2] == JPEG_MAGIC:
        try:
            return _decode_simplejpeg(data, box_fn, out_size, resample)
        except ValueError:
            pass  # e.g. CMYK or a recoverable libjpeg warning: let Pillow try
    return _decode_pillow(data, box_fn, out_size, resample)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """HWC uint8 RGB -> JPEG bytes."""
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
