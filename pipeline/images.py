"""Image bytes in, RGB pixels out, and the one error every stage reports for bad input.

Torch-free on purpose: opening a source or drawing patches must not pay torch's import. Tensors are
made in ``pipeline.tensors``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Refuse decompression bombs: a corrupt header can claim absurd sizes.
Image.MAX_IMAGE_PIXELS = 178_956_970

_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit PNG/TIFF grayscale opens as one of these


class BadImageError(ValueError):
    """Bytes that are not a decodable image; ``reason`` is what a report should say."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale scaled to 8 bits (x / 257); ``convert`` would clip at 255."""
    if img.mode in _WIDE_INT_MODES:
        arr = np.asarray(img).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":  # float images: [0, 1] when they fit in it, else taken as 0..255
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8), "L")
    return img


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (truncation is only found by decoding every pixel), apply the EXIF orientation,
    scale 16-bit to 8-bit, and convert to RGB (palette, grayscale, 1-bit, CMYK; alpha dropped)."""
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        img = _to_8bit(img)
        img = ImageOps.exif_transpose(img)  # what a viewer shows is what the user labelled
        return img.convert("RGB")
    except UnidentifiedImageError:
        raise BadImageError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, Warning) as e:
        raise BadImageError(f"cannot decode image: {e}") from None


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
