"""``mimflow data preview SOURCE --out grid.png``: look at the data before training on it."""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # runtime imports live in the functions: `mimflow --help` must not load torch
    from PIL import Image


@dataclass
class SourceSummary:
    spec: str
    kind: str
    items: int
    scanned: int = 0
    good: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count
    formats: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    fingerprint: str = ""


def summarise(spec: str, *, limit: int | None = None, keep: int = 64):
    """Scan up to ``limit`` items (all by default): counts, sizes, errors, and ``keep`` decoded samples."""
    from pipeline.images import BadImageError, decode_rgb
    from pipeline.sources import BadInput, Sample, open_source

    source = open_source(spec)
    summary = SourceSummary(spec, source.kind, len(source), fingerprint=source.fingerprint())
    classes: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    formats: collections.Counter = collections.Counter()
    shown: list[tuple["Image.Image", str]] = []
    for item in source:
        if limit is not None and summary.scanned >= limit:
            break
        summary.scanned += 1
        if isinstance(item, BadInput):
            summary.errors.append({"key": item.key, "origin": item.origin, "reason": item.reason})
            continue
        assert isinstance(item, Sample)
        try:
            img = decode_rgb(item.data)
        except BadImageError as e:
            summary.errors.append({"key": item.key, "origin": item.origin, "reason": e.reason})
            continue
        summary.good += 1
        sizes[f"{img.width}x{img.height}"] += 1
        formats[item.fmt] += 1
        name = source.classes[item.label] if (source.classes and item.label is not None) else "-"
        classes[name] += 1
        if len(shown) < keep:
            shown.append((img, name))
    summary.class_counts = dict(sorted(classes.items()))
    summary.sizes = dict(sizes.most_common(10))
    summary.formats = dict(formats.most_common())
    return summary, shown


def preview_grid(samples: list[tuple["Image.Image", str]], cell: int = 96, columns: int = 8) -> "Image.Image":
    """A grid of thumbnails, each captioned with its label."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(samples) // columns))
    caption = 12
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(samples):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption)
        grid.paste(img.resize((cell, cell), Image.Resampling.BICUBIC), (x, y))
        draw.text((x + 2, y + cell), label[:14], fill=(0, 0, 0))
    return grid


def cmd_preview(args: argparse.Namespace) -> int:
    summary, shown = summarise(args.source, limit=args.limit, keep=args.n)
    from PIL import Image

    from pipeline import storage
    from pipeline.errors import StageError

    out = args.out  # a local path or a URI
    image_format = Image.registered_extensions().get(os.path.splitext(out)[1].lower())
    if image_format is None:
        raise StageError(f"--out {out}: not an image file name (use .png or .jpg)")
    buf = io.BytesIO()
    preview_grid(shown, cell=args.cell).save(buf, format=image_format)
    storage.write_bytes_atomic(out, buf.getvalue())
    print(f"{summary.kind} source {summary.spec!r}: {summary.items} items (fingerprint {summary.fingerprint})")
    print(f"scanned {summary.scanned}: {summary.good} images, {len(summary.errors)} errors")
    if summary.class_counts:
        print("classes: " + ", ".join(f"{k}={v}" for k, v in summary.class_counts.items()))
    print("sizes: " + ", ".join(f"{k} ({v})" for k, v in summary.sizes.items()))
    print("formats: " + ", ".join(f"{k} ({v})" for k, v in summary.formats.items()))
    for err in summary.errors[:20]:
        print(f"  error: {err['key']} ({err['origin']}): {err['reason']}")
    if len(summary.errors) > 20:
        print(f"  ... and {len(summary.errors) - 20} more errors")
    print(f"wrote {out} ({len(shown)} images)")
    if args.json:
        storage.write_bytes_atomic(args.json, json.dumps(summary.__dict__, indent=2).encode())
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="inspect data sources")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser(
        "preview",
        help="write a labelled grid of samples and print counts, classes, sizes and errors",
        description="SOURCE: a folder, WebDataset tars (a.tar, s-{000..009}.tar), idx:DIR, or shapes?n=..&size=..; "
        "any of them with ?n=N (the first N items) or ?sample=N&subset_seed=S (a seeded random N).",
    )
    p.add_argument("source", help="source spec")
    p.add_argument("--out", default="preview.png", help="grid image to write (default: preview.png)")
    p.add_argument("--n", type=int, default=64, help="images in the grid (default: 64)")
    p.add_argument("--cell", type=int, default=96, help="thumbnail size in pixels (default: 96)")
    p.add_argument("--limit", type=int, default=None, help="scan at most this many items (default: all)")
    p.add_argument("--json", default=None, help="also write the summary as JSON here")
    p.set_defaults(handler=cmd_preview)
