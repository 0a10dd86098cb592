"""Token-cache bytes per sample for tiny images: the layout of cache format 3 against format 2's.

    python -m bench.bench_cache_size --size cpu

A real cache (``build_cache`` on Ray, a tiny dVAE with an 8x8 token grid, one view) of 2,000 ``shapes``
PNGs at each of 16 and 32 px. ``figure``: the cache's bytes (all shards) ÷ the source's PNG bytes;
``reference``: the same samples written in format 2's layout (image, ``tokens.npy``, ``views.json``,
``cls``: four tar members) ÷ the source's bytes; ``ratio`` = figure / reference. Two tar members per
sample remain (each a 512-byte header plus padding to 512), the floor of a layout that keeps the image
bytes in their own member. One JSON line per image size.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SIZES = {"cpu": {"images": 2000, "pixels": [16, 32]}, "gpu": {"images": 2000, "pixels": [16, 32]}}


def measure(work: Path, images: int, px: int) -> dict:
    from cache_fixture import format_2_members
    from pipeline.sources import Sample, open_source
    from pipeline.token_cache import decode_sample, read_cache_info, read_manifest, read_shard, shard_bytes, shard_urls
    from tokenizer.base import TokenizerConfig
    from tokenizer.checkpoint import build_tokenizer, save_tokenizer
    from tokenizer.precompute import build_cache

    spec = f"shapes?n={images}&size={px}&seed=0"
    source = sum(len(s.data) for s in open_source(spec) if isinstance(s, Sample))
    tok_dir = work / f"tok{px}"
    cfg = TokenizerConfig(kind="dvae", vocab_size=8192, grid=8, input_size=32, width=8, depth=1, code_dim=8)
    save_tokenizer(build_tokenizer(cfg), tok_dir)
    cache = build_cache(str(tok_dir), spec, str(work / f"cache{px}"), 1, num_actors=1, progress_every=60).cache_dir
    info = read_cache_info(cache)
    rows = read_manifest(cache)
    old = sum(len(shard_bytes([format_2_members(decode_sample(r)) for r in read_shard(url)]))
              for url in shard_urls(cache, rows))
    return {
        "bench": "cache_size",
        "figure": round(info.shard_bytes / source, 3),
        "reference": round(old / source, 3),
        "ratio": round(info.shard_bytes / old, 3),
        "unit": "cache bytes / source bytes",
        "sizes": {"images": images, "pixels": px, "views": 1, "grid": [8, 8]},
        "bytes": {"source": source, "format_3": info.shard_bytes, "format_2": old,
                  "per_sample_source": round(source / images, 1), "per_sample_format_3": info.bytes_per_sample,
                  "per_sample_format_2": round(old / images, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit, size_parser
    from pipeline.ray_context import ray_session

    args = size_parser(__doc__).parse_args(argv)
    size = SIZES[args.size]
    work = Path(tempfile.mkdtemp(prefix="bench-cache-size-"))
    try:
        with ray_session():  # one embedded Ray on loopback for both builds
            for px in size["pixels"]:
                emit(measure(work, size["images"], px))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
