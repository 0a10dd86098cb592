"""Hand-made token caches for tests and benchmarks whose shard layout the real builder cannot give
(uneven shard sizes, chosen token ids, a tokenizer that is not a checkpoint), and a trivial tokenizer.

Every cache here is committed with ``pipeline.token_cache.commit_cache`` (the builder's own writer of the
manifest and its ``CacheInfo``), so readers see exactly the contract. Tests that can afford the real
builder (``tokenizer.precompute.build_cache``) use it instead.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.images import decode_rgb
from pipeline.tensors import to_tensor
from pipeline.token_cache import CACHE_FORMAT, CacheInfo, CacheSample, commit_cache, encode_sample, errors_name, shard_name, write_shard
from pipeline.sources import Sample, open_source
from pipeline.views import make_views, render_view, views_to_json


class PatchColorTokenizer(torch.nn.Module):
    """Token = the patch's mean colour quantised to ``levels`` per channel (``levels**3`` codes)."""

    def __init__(self, grid: tuple[int, int] = (8, 8), input_size: int = 64, levels: int = 4):
        super().__init__()
        self.grid = tuple(grid)
        self.input_size = int(input_size)
        self.levels = int(levels)
        self.vocab_size = self.levels**3
        self.kind = "patchcolor"
        self.tokenizer_id = f"patchcolor{self.levels}-{self.grid[0]}x{self.grid[1]}-{self.input_size}"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        q = (F.adaptive_avg_pool2d(images.float(), self.grid) * self.levels).long().clamp_(0, self.levels - 1)
        return q[:, 0] * self.levels**2 + q[:, 1] * self.levels + q[:, 2]


def commit_shards(
    cache_dir: str,
    shards: Sequence[Sequence[dict[str, bytes]]],
    *,
    tokenizer_id: str,
    kind: str,
    vocab_size: int,
    grid: Sequence[int],
    input_size: int,
    views: int,
    classes: list[str] | None = None,
    source: str = "fixture",
    seed: int = 0,
    manifest: bool = True,
) -> str:
    """Write ``shards`` (lists of ``encode_sample`` members) as shard-000000.tar… and commit them."""
    created = datetime.now(timezone.utc).replace(microsecond=0)
    rows = []
    for index, members in enumerate(shards):
        n, nbytes, sha = write_shard(storage.join(cache_dir, shard_name(index)), members)
        rows.append({"shard": shard_name(index), "samples": n, "bytes": nbytes, "sha256": sha,
                     "tokenizer_id": tokenizer_id, "source_fingerprint": "fixture", "views": views,
                     "created": created})
    samples = sum(r["samples"] for r in rows)
    info = CacheInfo(
        format=CACHE_FORMAT, tokenizer_id=tokenizer_id, tokenizer_dir="", kind=kind, vocab_size=int(vocab_size),
        grid=[int(g) for g in grid], input_size=int(input_size), views=views, seed=seed, source=source,
        source_kind="fixture", source_fingerprint="fixture", source_size=samples, partitions=len(rows),
        partition_size=max([r["samples"] for r in rows], default=0), shards=len(rows), samples=samples, errors=0,
        errors_file=errors_name([]), classes=classes, created=created.isoformat(),
        shard_bytes=sum(r["bytes"] for r in rows),
        image_bytes=sum(len(v) for ms in shards for m in ms for k, v in m.items() if k not in ("__key__", "mim")),
        bytes_per_sample=round(sum(r["bytes"] for r in rows) / samples, 1) if samples else 0.0,
    )
    if manifest:
        commit_cache(cache_dir, info, rows, [])  # the builder's writer: the manifest last
    return cache_dir


def format_2_members(s: CacheSample) -> dict[str, bytes]:
    """A sample as mimflow wrote it before cache format 3: four tar members (the image, ``tokens.npy``,
    ``views.json``, ``cls`` when labelled); for the old-layout tests and the cache-size benchmark."""
    buf = io.BytesIO()
    np.save(buf, s.tokens, allow_pickle=False)
    members = {"__key__": s.key.encode(), s.fmt: s.image, "tokens.npy": buf.getvalue(),
               "views.json": views_to_json(s.width, s.height, s.views)}
    if s.label is not None:
        members["cls"] = str(s.label).encode()
    return members


def write_cache(
    cache_dir: str,
    tokenizer: Any,
    source: str = "shapes?n=64&size=64&seed=3",
    shard_sizes: Sequence[int] | None = None,
    views: int = 1,
    *,
    manifest: bool = True,
    seed: int = 0,
) -> str:
    """Tokenize ``source`` into ``cache_dir`` in the cache format; ``shard_sizes`` splits it (default: 1 shard)."""
    src = open_source(source)
    samples = [s for s in src if isinstance(s, Sample)]
    sizes = list(shard_sizes) if shard_sizes else [len(samples)]
    if sum(sizes) > len(samples):
        raise ValueError(f"shard sizes {sizes} need {sum(sizes)} samples, the source has {len(samples)}")
    params = list(tokenizer.parameters()) if isinstance(tokenizer, torch.nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    shards, start = [], 0
    for size in sizes:
        members = []
        for s in samples[start : start + size]:
            img = decode_rgb(s.data)
            vs = make_views(s.key, img.width, img.height, views, seed=seed)
            batch = torch.stack([to_tensor(render_view(img, v, tokenizer.input_size)) for v in vs])
            with torch.no_grad():
                tokens = tokenizer.encode(batch.to(device)).cpu().numpy().astype(np.uint16)
            members.append(encode_sample(s.key, s.data, s.fmt, tokens, img.width, img.height, vs, s.label))
        start += size
        shards.append(members)
    return commit_shards(
        cache_dir, shards, tokenizer_id=tokenizer.tokenizer_id, kind=getattr(tokenizer, "kind", "unknown"),
        vocab_size=tokenizer.vocab_size, grid=tokenizer.grid, input_size=tokenizer.input_size, views=views,
        classes=src.classes, source=source, seed=seed, manifest=manifest,
    )


__all__ = ["PatchColorTokenizer", "commit_shards", "format_2_members", "write_cache"]
