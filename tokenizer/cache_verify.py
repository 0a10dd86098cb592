"""``mimflow tokens verify DIR``: check a token cache against its manifest and its contract.

Every shard listed in ``manifest.parquet``: present, its size and sha256 as listed, readable as a tar,
the listed number of samples; every sample: one image member and a readable ``.mim`` member whose tokens
have the shape ``[V, h, w]`` the manifest's ``CacheInfo`` says, ids < vocab size, and V views inside the image;
keys unique across the whole cache; the counts add up (samples + errors = source size). Nothing is
fixed: the report lists each problem, and a caller exits non-zero when there is one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


from pipeline import storage
from pipeline.token_cache import (
    SAMPLE_MEMBER,
    CacheError,
    CacheInfo,
    parse_shard,
    read_cache_info,
    read_errors,
    read_manifest,
    unpack_meta,
)
from pipeline.views import views_from_json

MAX_LISTED = 20  # problems listed per shard before "... and N more"


@dataclass
class VerifyReport:
    cache_dir: str
    shards: int = 0
    samples: int = 0
    errors: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{self.cache_dir}: {self.shards} shards, {self.samples} samples, {self.errors} error rows, "
            f"{self.bytes / 1e6:.1f} MB"
        )
        if self.ok:
            return f"OK  {head}"
        lines = [f"FAIL {head}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class _ShardResult:
    shard: str
    keys: list[str]
    bytes: int
    problems: list[str]


def _check_shard(cache_dir: str, row: dict[str, Any], info: CacheInfo, decode_images: bool) -> _ShardResult:
    name = row["shard"]
    loc = storage.join(cache_dir, name)
    problems: list[str] = []
    if not storage.exists(loc):
        return _ShardResult(name, [], 0, [f"{name}: missing"])
    data = storage.read_bytes(loc)
    if len(data) != row["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, manifest says {row['bytes']} (truncated or replaced)")
    sha = hashlib.sha256(data).hexdigest()
    if sha != row["sha256"]:
        problems.append(f"{name}: sha256 {sha[:12]}… differs from the manifest's {str(row['sha256'])[:12]}…")
    try:
        samples = parse_shard(data)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: not a readable tar: {e}")
        return _ShardResult(name, [], len(data), problems)
    if len(samples) != row["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {row['samples']}")
    want = (info.views, *info.grid)
    vocab = info.vocab_size
    keys = []
    bad: list[str] = []
    for s in samples:
        key = s["__key__"]
        keys.append(key)
        bad.extend(f"{name}/{key}: {p}" for p in _check_sample(s, want, vocab, decode_images))
    if len(bad) > MAX_LISTED:
        bad = bad[:MAX_LISTED] + [f"{name}: … and {len(bad) - MAX_LISTED} more sample problem(s)"]
    return _ShardResult(name, keys, len(data), problems + bad)


def _check_sample(s: dict[str, Any], want: tuple, vocab: int, decode_images: bool) -> list[str]:
    from pipeline.images import IMAGE_EXTENSIONS

    problems = []
    images = [k for k in s if k in IMAGE_EXTENSIONS]
    others = sorted(k for k in s if not k.startswith("__") and k not in IMAGE_EXTENSIONS and k != SAMPLE_MEMBER)
    if len(images) != 1:
        problems.append(f"expected one image member, found {images or 'none'}")
    if others:
        problems.append(f"unexpected member(s) {others}" + (" (cache format 2)" if "tokens.npy" in others else ""))
    if SAMPLE_MEMBER not in s:
        return problems + [f"no .{SAMPLE_MEMBER} member"]
    try:
        tokens, views_json, _ = unpack_meta(s[SAMPLE_MEMBER])
    except ValueError as e:
        return problems + [f".{SAMPLE_MEMBER} unreadable: {e}"]
    if tuple(tokens.shape) != want:
        problems.append(f"tokens shape {tuple(tokens.shape)}, expected {want}")
    if tokens.size and int(tokens.max()) >= vocab:
        problems.append(f"token id {int(tokens.max())} >= vocab size {vocab}")
    try:
        width, height, views = views_from_json(views_json)
        if len(views) != want[0]:
            problems.append(f"views JSON has {len(views)} views, expected {want[0]}")
        for v in views:
            x0, y0, x1, y1 = v.box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                problems.append(f"view box {v.box} outside the {width}x{height} image")
    except (KeyError, ValueError, TypeError) as e:
        problems.append(f"views JSON unreadable: {e}")
        width = height = None
    if decode_images and images:
        from pipeline.images import BadImageError, decode_rgb

        try:
            img = decode_rgb(s[images[0]])
            if width is not None and (img.width, img.height) != (width, height):
                problems.append(f"image is {img.width}x{img.height}, the views JSON says {width}x{height}")
        except BadImageError as e:
            problems.append(f"image does not decode: {e.reason}")
    return problems


def verify_cache(cache_dir: str, *, decode_images: bool = False, threads: int | None = None) -> VerifyReport:
    report = VerifyReport(str(cache_dir))
    try:
        info = read_cache_info(cache_dir)
        rows = read_manifest(cache_dir)
    except (CacheError, ValueError) as e:
        report.problems.append(str(e))
        return report
    report.shards = len(rows)
    names = [r["shard"] for r in rows]
    if len(set(names)) != len(names):
        report.problems.append("the manifest lists a shard more than once")
    for r in rows:
        if r["tokenizer_id"] != info.tokenizer_id:
            report.problems.append(f"{r['shard']}: tokenizer {r['tokenizer_id']}, the cache info says {info.tokenizer_id}")
        if r["views"] != info.views:
            report.problems.append(f"{r['shard']}: {r['views']} views, the cache info says {info.views}")
        if r["source_fingerprint"] != info.source_fingerprint:
            report.problems.append(f"{r['shard']}: built from another version of the source than the cache info names")

    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda r: _check_shard(cache_dir, r, info, decode_images), rows))
    seen: dict[str, str] = {}
    dupes = []
    for res in results:
        report.problems.extend(res.problems)
        report.bytes += res.bytes
        report.samples += len(res.keys)
        for k in res.keys:
            if k in seen:
                dupes.append(f"key {k!r} in {seen[k]} and {res.shard}")
            else:
                seen[k] = res.shard
    if dupes:
        report.problems.append(f"{len(dupes)} duplicate key(s): " + "; ".join(dupes[:5]) + (" …" if len(dupes) > 5 else ""))

    try:
        report.errors = len(read_errors(cache_dir, info))
    except (CacheError, OSError, ValueError) as e:
        report.problems.append(str(e))
    if len(rows) != info.shards:
        report.problems.append(f"{len(rows)} shards in the manifest, the cache info says {info.shards}")
    if report.samples != info.samples:
        report.problems.append(f"{report.samples} samples in the shards, the cache info says {info.samples}")
    if report.errors != info.errors:
        report.problems.append(f"{report.errors} error rows, the cache info says {info.errors}")
    if report.samples + report.errors != info.source_size:
        report.problems.append(
            f"samples + errors = {report.samples + report.errors}, the source had {info.source_size} items"
        )
    return report


def verify_json(report: VerifyReport) -> str:
    return json.dumps(
        {
            "cache_dir": report.cache_dir,
            "ok": report.ok,
            "shards": report.shards,
            "samples": report.samples,
            "errors": report.errors,
            "bytes": report.bytes,
            "problems": report.problems,
        }
    )
