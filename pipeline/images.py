"""Image bytes in, RGB pixels out, and the one error every stage reports for bad input."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Refuse decompression bombs: a corrupt header can claim absurd sizes.
Image.MAX_IMAGE_PIXELS = 178_956_970


class BadImageError(ValueError):
    """Bytes that are not a decodable image; ``reason`` is what a report should say."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (truncation is only found by decoding every pixel) and convert to RGB."""
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        return img.convert("RGB")
    except UnidentifiedImageError:
        raise BadImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as e:
        raise BadImageError(f"cannot decode image: {e}") from None


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
