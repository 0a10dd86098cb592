"""Small real-format token caches for tests and benchmarks, and a trivial stand-in tokenizer.

``write_cache`` writes exactly what the cache builder writes (``pipeline.shards``: shards, cache.json,
manifest last) from any source, with the shard sizes you ask for (uneven ones included), tokenizing
each view as rendered by ``pipeline.views.render_view``. ``PatchColorTokenizer`` has the tokenizer
interface (``tokenizer_id``, ``vocab_size``, ``grid``, ``input_size``, ``encode``) and maps each patch
to its quantised mean colour: learnable targets for tests that need a loss to fall, at no training cost.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.images import decode_rgb
from pipeline.shards import CACHE_INFO, encode_sample, shard_name, write_manifest, write_shard
from pipeline.tensors import to_tensor
from pipeline.sources import Sample, open_source
from pipeline.views import make_views, render_view


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
    samples = [s for s in open_source(source) if isinstance(s, Sample)]
    sizes = list(shard_sizes) if shard_sizes else [len(samples)]
    if sum(sizes) > len(samples):
        raise ValueError(f"shard sizes {sizes} need {sum(sizes)} samples, the source has {len(samples)}")
    params = list(tokenizer.parameters()) if isinstance(tokenizer, torch.nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    rows, start = [], 0
    created = datetime.now(timezone.utc).replace(microsecond=0)
    for index, size in enumerate(sizes):
        members = []
        for s in samples[start : start + size]:
            img = decode_rgb(s.data)
            vs = make_views(s.key, img.width, img.height, views, seed=seed)
            batch = torch.stack([to_tensor(render_view(img, v, tokenizer.input_size)) for v in vs])
            with torch.no_grad():
                tokens = tokenizer.encode(batch.to(device)).cpu().numpy().astype(np.uint16)
            members.append(encode_sample(s.key, s.data, s.fmt, tokens, img.width, img.height, vs, s.label))
        start += size
        name = shard_name(index)
        n, nbytes, sha = write_shard(storage.join(cache_dir, name), members)
        rows.append({"shard": name, "samples": n, "bytes": nbytes, "sha256": sha,
                     "tokenizer_id": tokenizer.tokenizer_id, "source_fingerprint": "synthetic", "views": views,
                     "created": created})
    info = {"format": 1, "tokenizer_id": tokenizer.tokenizer_id, "kind": getattr(tokenizer, "kind", "unknown"),
            "vocab_size": int(tokenizer.vocab_size), "grid": list(tokenizer.grid),
            "input_size": int(tokenizer.input_size), "views": views, "source": source, "samples": start}
    storage.write_bytes_atomic(storage.join(cache_dir, CACHE_INFO), json.dumps(info, indent=1).encode())
    if manifest:
        write_manifest(cache_dir, rows)  # last: the commit point
    return cache_dir


__all__ = ["PatchColorTokenizer", "write_cache"]
