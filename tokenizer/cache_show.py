"""``mimflow tokens show DIR [KEY…|--n 8] --out tokens.png``: look at what the cache holds.

``size_line``: bytes per sample (the image's share and the rest), from the manifest's ``CacheInfo``.
One row per (sample, view): the view as the tokenizer saw it (rebuilt from its stored views with
``pipeline.views.render_view``), its token map with every patch coloured by its id, and for a dVAE
the image decoded from the stored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pipeline import storage
from pipeline.token_cache import CacheError, CacheInfo, CacheSample, check_cache, decode_sample, read_shard, shard_urls

if TYPE_CHECKING:
    from PIL import Image


def token_palette(vocab_size: int) -> np.ndarray:
    """A fixed colour per token id (uint8 [vocab, 3]); neighbouring ids get unrelated colours."""
    rng = np.random.default_rng(12345)
    return rng.integers(32, 256, size=(vocab_size, 3), dtype=np.uint8)


def token_map_image(tokens: np.ndarray, palette: np.ndarray, size: int) -> "Image.Image":
    from PIL import Image

    pixels = palette[np.asarray(tokens, dtype=np.int64) % len(palette)]
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)


@dataclass
class ShownRow:
    key: str
    view: int
    label: int | None
    image: "Image.Image"
    tokens: np.ndarray
    decoded: "Image.Image | None" = None


def size_line(info: CacheInfo) -> str:
    """What the cache costs on disk per sample, and how much of it is the source images."""
    n = max(1, info.samples)
    image, rest = info.image_bytes / n, (info.shard_bytes - info.image_bytes) / n
    return (f"{info.samples} samples in {info.shards} shard(s), {info.shard_bytes / 1e6:.2f} MB: "
            f"{info.bytes_per_sample:.0f} bytes/sample ({image:.0f} image, {rest:.0f} tokens, views, label and tar)")


def find_samples(cache_dir: str, keys: Sequence[str] = (), n: int = 8) -> list[CacheSample]:
    """The samples with these keys (in the order asked), or the first ``n`` of the cache."""
    _, rows = check_cache(cache_dir)
    wanted = list(keys)
    found: dict[str, CacheSample] = {}
    out: list[CacheSample] = []
    for url in shard_urls(cache_dir, rows):
        for raw in read_shard(url):
            if wanted:
                if raw["__key__"] in wanted:
                    found[raw["__key__"]] = decode_sample(raw)
            else:
                out.append(decode_sample(raw))
                if len(out) >= n:
                    return out
        if wanted and len(found) == len(wanted):
            break
    if wanted:
        missing = [k for k in wanted if k not in found]
        if missing:
            raise CacheError(f"key(s) not in {cache_dir}: {', '.join(missing[:10])}")
        return [found[k] for k in wanted]
    return out


def _load_tokenizer_for(info: CacheInfo, tokenizer_dir: str | None):
    from tokenizer.checkpoint import load_tokenizer

    path = tokenizer_dir or info.tokenizer_dir
    if not path or not storage.exists(path):
        return None
    tok = load_tokenizer(path)
    if tok.tokenizer_id != info.tokenizer_id:
        raise CacheError(f"tokenizer at {path} is {tok.tokenizer_id}, the cache was made by {info.tokenizer_id}")
    return tok


def show_rows(
    cache_dir: str, keys: Sequence[str] = (), n: int = 8, tokenizer_dir: str | None = None, max_views: int = 4
) -> list[ShownRow]:
    from pipeline.images import decode_rgb
    from pipeline.views import render_view

    info, _ = check_cache(cache_dir)
    size = info.input_size
    samples = find_samples(cache_dir, keys, n)
    tok = _load_tokenizer_for(info, tokenizer_dir) if info.kind == "dvae" else None
    tok = tok if tok is not None and tok.can_decode else None  # e.g. DALL-E imported without its decoder
    rows: list[ShownRow] = []
    for s in samples:
        img = decode_rgb(s.image)
        for v, view in enumerate(s.views[:max_views]):
            rows.append(ShownRow(s.key, v, s.label, render_view(img, view, size, "tokenizer"), s.tokens[v]))
    if tok is not None and rows:
        import torch

        with torch.inference_mode():
            decoded = tok.decode(torch.from_numpy(np.stack([r.tokens.astype(np.int64) for r in rows])))
        arr = (decoded.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        from PIL import Image

        for r, a in zip(rows, arr):
            r.decoded = Image.fromarray(a)
    return rows


def render_sheet(rows: list[ShownRow], vocab_size: int, classes: list[str] | None, cell: int = 128) -> "Image.Image":
    from PIL import Image, ImageDraw

    palette = token_palette(vocab_size)
    cols = 3 if any(r.decoded is not None for r in rows) else 2
    caption = 14
    sheet = Image.new("RGB", (cols * (cell + 4), max(1, len(rows)) * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        y = i * (cell + caption)
        tiles = [r.image.resize((cell, cell), Image.Resampling.BICUBIC), token_map_image(r.tokens, palette, cell)]
        if r.decoded is not None:
            tiles.append(r.decoded.resize((cell, cell), Image.Resampling.BICUBIC))
        for j, tile in enumerate(tiles):
            sheet.paste(tile, (j * (cell + 4), y))
        label = classes[r.label] if classes and r.label is not None and r.label < len(classes) else r.label
        text = f"{r.key} v{r.view}" + (f" [{label}]" if label is not None else "")
        text += f"  {len(np.unique(r.tokens))} ids"
        draw.text((2, y + cell), text[: cols * 22], fill=(0, 0, 0))
    return sheet


def show(
    cache_dir: str,
    out: str,
    keys: Sequence[str] = (),
    n: int = 8,
    tokenizer_dir: str | None = None,
    cell: int = 128,
) -> list[ShownRow]:
    info, _ = check_cache(cache_dir)
    rows = show_rows(cache_dir, keys, n, tokenizer_dir)
    sheet = render_sheet(rows, info.vocab_size, info.classes, cell)
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes_atomic(out, buf.getvalue())
    return rows
