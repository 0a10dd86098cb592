"""The one decoder: pixels as image-library users expect them, and clear errors for bad bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import BadImageError, decode_rgb


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_16bit(width: int = 64, height: int = 8) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG spanning the whole 0..65535 range, and its 8-bit expectation."""
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    arr = np.tile(ramp, (height, 1))
    return _save(Image.fromarray(arr), "PNG"), np.round(arr / 257.0).astype(np.uint8)


def jpeg_exif_rotated() -> bytes:
    """20 wide x 10 high, left half red, with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif, quality=95)


def png_bomb(side: int = 20000) -> bytes:
    """A PNG whose header claims side x side pixels (far past the decompression-bomb limit)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_16bit_png_is_scaled_not_clipped():
    data, want = png_16bit()
    got = np.asarray(decode_rgb(data))
    assert got.shape == (8, 64, 3) and got.dtype == np.uint8
    assert np.abs(got[..., 0].astype(int) - want).max() <= 1
    assert (got == 255).mean() < 0.05  # clipping put 99.6% of pixels at 255


def test_exif_orientation_is_applied():
    img = decode_rgb(jpeg_exif_rotated())
    assert img.size == (10, 20)  # rotated to portrait
    top, bottom = np.asarray(img)[2, 5], np.asarray(img)[17, 5]
    assert top[0] > 200 and top[2] < 60  # the red half is on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "1", "CMYK", "LA", "I;16"])
def test_every_mode_comes_out_rgb(mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img).astype(np.uint16) * 257))
    out = decode_rgb(_save(img, "JPEG" if mode == "CMYK" else ("TIFF" if mode == "LA" else "PNG")))
    assert out.mode == "RGB" and out.size == (7, 9)


def test_bad_bytes_are_bad_image_errors():
    with pytest.raises(BadImageError, match="empty"):
        decode_rgb(b"")
    with pytest.raises(BadImageError, match="not a recognised"):
        decode_rgb(b"hello, world")
    with pytest.raises(BadImageError, match="decompression bomb|exceeds limit"):
        decode_rgb(png_bomb())
    good = _save(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG")
    with pytest.raises(BadImageError, match="cannot decode"):
        decode_rgb(good[: len(good) // 2])
