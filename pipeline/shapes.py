"""``shapes``: a deterministic synthetic dataset that needs no download.

Each image is one solid shape (the class) drawn at a random position, scale and rotation, in a random
colour that contrasts with a random smooth background. Colour and background carry no class
information, so an encoder must see form to classify: the mean-pooled features of a random-init ViT,
dominated by colour, score near chance. Image ``i`` of a split is a pure function of
(seed, split, i, size), at any resolution.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 3
CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "crescent",
    "arrow",
)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"shapes:{GENERATOR_VERSION}:{seed}:{split}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _polygon(cx: float, cy: float, radius: float, angle: float, points: list[tuple[float, float]]):
    """``points`` in polar form (relative radius, angle) rotated by ``angle``, scaled by ``radius``."""
    return [(cx + radius * r * math.cos(a + angle), cy + radius * r * math.sin(a + angle)) for r, a in points]


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(r, phase + 2 * math.pi * k / n) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    return [(1.0 if k % 2 == 0 else 0.45, math.pi * k / 5 - math.pi / 2) for k in range(10)]


def _cross() -> list[tuple[float, float]]:
    w = 0.33
    xy = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    return [(math.hypot(x, y), math.atan2(y, x)) for x, y in xy]


def _arrow() -> list[tuple[float, float]]:
    xy = [(1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3), (-1, -0.3), (0.1, -0.3), (0.1, -0.8)]
    return [(math.hypot(x, y), math.atan2(y, x)) for x, y in xy]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-tone background (a linear gradient or upsampled noise) with a little pixel noise.

    Smooth on purpose: a background with edges of its own (stripes, checks) floods the per-patch
    statistics with texture that says nothing about the class, and at demo scale (a few thousand
    steps of a tiny ViT) the pretrained encoder then learns background texture instead of form.
    """
    base = rng.uniform(0, 255, size=3)
    other = np.clip(base + rng.uniform(-40, 40, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if rng.random() < 0.5:  # linear gradient
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(theta) + yy * math.sin(theta) + 1.5) / 3
    else:  # smooth noise: an upsampled random 4x4 grid
        coarse = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255.0
    img = base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(label: int, rng: np.random.Generator, size: int, scale: int = 4) -> Image.Image:
    """Draw at ``scale``× and downsample for anti-aliased edges."""
    big = size * scale
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    radius = big * rng.uniform(0.26, 0.42)
    cx = rng.uniform(radius, big - radius)
    cy = rng.uniform(radius, big - radius)
    angle = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, radius, angle, _regular(4)), fill=255)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, radius, angle, _regular(3)), fill=255)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, radius, angle, _star()), fill=255)
    elif name == "cross":
        draw.polygon(_polygon(cx, cy, radius, angle, _cross()), fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif name == "diamond":
        draw.polygon(_polygon(cx, cy, radius, angle, [(1, 0), (0.55, math.pi / 2), (1, math.pi), (0.55, -math.pi / 2)]), fill=255)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, radius, angle, _regular(6)), fill=255)
    elif name == "crescent":
        draw.ellipse(box, fill=255)
        off = radius * 0.5
        ox, oy = cx + off * math.cos(angle), cy + off * math.sin(angle)
        draw.ellipse((ox - radius * 0.85, oy - radius * 0.85, ox + radius * 0.85, oy + radius * 0.85), fill=0)
    elif name == "arrow":
        draw.polygon(_polygon(cx, cy, radius, angle, _arrow()), fill=255)
    return mask.resize((size, size), Image.Resampling.LANCZOS)


def render_shape(index: int, *, size: int = 64, seed: int = 0, split: str = "train") -> tuple[np.ndarray, int]:
    """Image ``index`` of the split: ``(uint8 [size, size, 3], label)``."""
    if size < 8:
        raise ValueError(f"shapes needs size >= 8, got {size}")
    rng = _rng(seed, split, index)
    label = int(rng.integers(0, len(CLASSES)))
    background = _background(rng, size)
    img = background.astype(np.float32)
    # The shape's colour stands out from the background's mean luminance, so its outline is visible.
    lum = np.array([0.299, 0.587, 0.114])
    bg_lum = float(background.reshape(-1, 3).mean(0) @ lum)
    colour = rng.uniform(30, 255, size=3)
    for _ in range(20):
        if abs(float(colour @ lum) - bg_lum) >= 70:
            break
        colour = rng.uniform(30, 255, size=3)
    alpha = np.asarray(_shape_mask(label, rng, size), np.float32)[..., None] / 255.0
    img = img * (1 - alpha) + colour[None, None, :] * alpha
    return np.clip(img, 0, 255).astype(np.uint8), label
