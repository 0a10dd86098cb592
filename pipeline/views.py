"""Views: the crops the token cache stores tokens for, and that training rebuilds exactly.

A view is a crop box in source pixels, a flip flag, the colour-jitter factors in the order they are
applied, and the interpolation of each side (the image the ViT sees, the tokenizer's input).
``make_views`` draws them from a seed derived from the sample key, so a rebuild of the cache gives
the same views; ``render_view`` is the single function that turns (image, view, size, side) into
pixels, used both when tokens are computed and when the pretraining loader rebuilds the crop.

BEiT v1/v2 jitter, flip and crop *before* splitting into the ViT input and the tokenizer input, so
the tokens belong to the jittered crop; ``render_view`` follows that order (jitter on the whole
image, as torchvision's ``ColorJitter`` on a PIL image does: PIL ``ImageEnhance``, contrast around
the whole image's mean grey), which makes the result a pure function of (image, view).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

from PIL import Image, ImageEnhance

from pipeline.config import Range

# PIL filters by the names torchvision/timm use for them
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
# torchvision's ColorJitter adjustments on PIL images are these ImageEnhance classes
JITTER_OPS = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
              "saturation": ImageEnhance.Color}
Side = Literal["image", "tokenizer"]


@dataclass(frozen=True)
class View:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, x1/y1 exclusive
    flip: bool = False
    jitter: tuple[tuple[str, float], ...] = ()  # (op, factor) in the order applied; () = none
    interp: str = "bicubic"  # resampling of the image side (what the ViT sees)
    tok_interp: str = "bicubic"  # resampling of the tokenizer side


@dataclass(frozen=True)
class ViewStyle:
    """How a cache's views are drawn and rendered: crop area range and colour jitter (random views,
    V > 1, only), and each side's interpolation (every view)."""

    scale: tuple[float, float] = (0.4, 1.0)
    jitter: float = 0.0  # ColorJitter strength of brightness, contrast and saturation; 0 = none
    interp: str = "bicubic"
    tok_interp: str = "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))  # configs give lists
        if len(self.scale) != 2:
            raise ValueError(f"view crop scale must be [lo, hi], got {list(self.scale)}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"view crop scale must be 0 < lo <= hi <= 1, got {list(self.scale)}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"view jitter strength must be in [0, 1], got {self.jitter}")
        for side, name in (("interp", self.interp), ("tok_interp", self.tok_interp)):
            if name not in INTERPOLATIONS:
                raise ValueError(f"view {side} {name!r} is not one of {sorted(INTERPOLATIONS)}")

    def key(self) -> str:
        """A canonical one-line form; "" for the default style (what caches made before styles used)."""
        if self == ViewStyle():
            return ""
        return (f"scale={self.scale[0]:g}:{self.scale[1]:g},jitter={self.jitter:g},"
                f"interp={self.interp},tok_interp={self.tok_interp}")

    @classmethod
    def parse(cls, text: str) -> "ViewStyle":
        """The inverse of ``key``."""
        if not text:
            return cls()
        try:
            kv = dict(part.split("=", 1) for part in text.split(","))
            lo, hi = (float(x) for x in kv["scale"].split(":"))
            return cls((lo, hi), float(kv["jitter"]), kv["interp"], kv["tok_interp"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"view style {text!r} is not readable ({e})") from None

    def with_(self, **changes) -> "ViewStyle":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class ViewStyleFields:
    """A ``ViewStyle`` as flat config keys, for the configs that build a cache (stage 1's ``tokens``
    section, ``mimflow run``); ``style()`` is the value."""

    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # random views' crop area range
    jitter: Annotated[float, Range(ge=0, le=1)] = 0.0  # colour-jitter strength (brightness, contrast, saturation)
    interp: Interpolation = "bicubic"  # the ViT side's resampling
    tok_interp: Interpolation = "bicubic"  # the tokenizer side's resampling

    def style(self) -> ViewStyle:
        return ViewStyle(tuple(self.crop_scale), self.jitter, self.interp, self.tok_interp)

    def validate(self) -> None:
        self.style()  # a bad crop scale is one line naming it


def centre_view(width: int, height: int, style: ViewStyle | None = None) -> View:
    """The centred square: no flip, no jitter (the identity when the image is square at the size)."""
    style = style or ViewStyle()
    side = min(width, height)
    x0 = (width - side) // 2
    y0 = (height - side) // 2
    return View((x0, y0, x0 + side, y0 + side), False, (), style.interp, style.tok_interp)


def make_views(
    key: str,
    width: int,
    height: int,
    num_views: int,
    *,
    seed: int = 0,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    style: ViewStyle | None = None,
) -> list[View]:
    """V=1: the centre square. V>1: random-resized crops + flips (+ jitter) seeded by (seed, key)."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    style = style or ViewStyle()
    if scale is not None:
        style = replace(style, scale=tuple(scale))
    if num_views == 1:
        return [centre_view(width, height, style)]
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    return [draw_view(rng, width, height, style, ratio) for _ in range(num_views)]


def draw_view(
    rng: random.Random, width: int, height: int, style: ViewStyle, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> View:
    """One random view: a random-resized crop + flip, then (jitter > 0) the jitter factors and order."""
    view = random_resized_crop(rng, width, height, style.scale, ratio)
    jitter: tuple[tuple[str, float], ...] = ()
    if style.jitter > 0:  # no draws when off: the crops of a no-jitter style stay what they always were
        # torchvision: each factor uniform in [1 - s, 1 + s], the ops in a random order; rounded so
        # that views.json stays short and reads back to the same float
        factors = {op: round(rng.uniform(1 - style.jitter, 1 + style.jitter), 6) for op in JITTER_OPS}
        order = list(JITTER_OPS)
        rng.shuffle(order)
        jitter = tuple((op, factors[op]) for op in order)
    return View(view.box, view.flip, jitter, style.interp, style.tok_interp)


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


def apply_jitter(img: Image.Image, jitter: tuple[tuple[str, float], ...]) -> Image.Image:
    """The view's colour jitter, in its order, on the whole image (integer PIL ops: deterministic)."""
    for op, factor in jitter:
        img = JITTER_OPS[op](img).enhance(factor)
    return img


def render_view(img: Image.Image, view: View, size: int, side: Side = "image") -> Image.Image:
    """Jitter, crop ``view.box``, resize to ``size``×``size`` with the side's interpolation, flip if asked.

    ``side`` is "image" for what the ViT sees, "tokenizer" for the tokenizer's input. A crop of the
    whole image at its own size is the image itself (PIL does not resample then).
    """
    if view.jitter:
        img = apply_jitter(img, view.jitter)
    resample = INTERPOLATIONS[view.interp if side == "image" else view.tok_interp]
    out = img.crop(view.box).resize((size, size), resample)
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def views_to_json(width: int, height: int, views: list[View]) -> bytes:
    """Only what differs from the defaults is written, so views without jitter read as before."""
    docs = []
    for v in views:
        d: dict = {"box": list(v.box), "flip": v.flip}
        if v.jitter:
            d["jitter"] = [[op, f] for op, f in v.jitter]
        if v.interp != "bicubic":
            d["interp"] = v.interp
        if v.tok_interp != "bicubic":
            d["tok_interp"] = v.tok_interp
        docs.append(d)
    return json.dumps({"size": [width, height], "views": docs}, separators=(",", ":")).encode()


def views_from_json(data: bytes | str) -> tuple[int, int, list[View]]:
    """Views as written; fields a cache made before jitter lacks read as no jitter, bicubic both sides."""
    doc = json.loads(data)
    width, height = doc["size"]
    views = []
    for v in doc["views"]:
        jitter = tuple((str(op), float(f)) for op, f in v.get("jitter", ()))
        interp, tok_interp = v.get("interp", "bicubic"), v.get("tok_interp", "bicubic")
        bad = [op for op, _ in jitter if op not in JITTER_OPS] + [
            i for i in (interp, tok_interp) if i not in INTERPOLATIONS]
        if bad:
            raise ValueError(f"views.json: unknown jitter op or interpolation {bad[0]!r}")
        views.append(View(tuple(v["box"]), bool(v["flip"]), jitter, interp, tok_interp))
    return width, height, views
