"""Views: the crops the token cache stores tokens for, and that training rebuilds exactly.

A view is a crop box in source pixels plus a flip flag. ``make_views`` draws them from a seed
derived from the sample key, so a rebuild of the cache gives the same views; ``render_view`` is the
single function that turns (image, view, size) into pixels, used both when tokens are computed and
when the pretraining loader rebuilds the crop.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class View:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, x1/y1 exclusive
    flip: bool = False


def centre_view(width: int, height: int) -> View:
    side = min(width, height)
    x0 = (width - side) // 2
    y0 = (height - side) // 2
    return View((x0, y0, x0 + side, y0 + side), False)


def make_views(
    key: str,
    width: int,
    height: int,
    num_views: int,
    *,
    seed: int = 0,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> list[View]:
    """V=1: the centre square. V>1: random-resized crops + flips seeded by (seed, key)."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if num_views == 1:
        return [centre_view(width, height)]
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    return [random_resized_crop(rng, width, height, scale, ratio) for _ in range(num_views)]


def random_resized_crop(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> View:
    """A random-resized crop box + flip, drawn as torchvision draws them (fallback: the centre square).

    The cache's views (``make_views``) and pretraining's online augmentation both draw from here.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.randint(0, width - w)
            y0 = rng.randint(0, height - h)
            return View((x0, y0, x0 + w, y0 + h), rng.random() < 0.5)
    view = centre_view(width, height)  # same fallback as torchvision: the centre
    return View(view.box, rng.random() < 0.5)


def render_view(img: Image.Image, view: View, size: int) -> Image.Image:
    """Crop ``view.box`` from ``img``, resize to ``size``×``size`` (bicubic), flip if asked."""
    out = img.crop(view.box).resize((size, size), Image.Resampling.BICUBIC)
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def views_to_json(width: int, height: int, views: list[View]) -> bytes:
    doc = {"size": [width, height], "views": [{"box": list(v.box), "flip": v.flip} for v in views]}
    return json.dumps(doc, separators=(",", ":")).encode()


def views_from_json(data: bytes | str) -> tuple[int, int, list[View]]:
    doc = json.loads(data)
    width, height = doc["size"]
    views = [View(tuple(v["box"]), bool(v["flip"])) for v in doc["views"]]
    return width, height, views
