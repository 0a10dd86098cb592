"""``codebook_report``: the whole report, distributed over the cache's shards with Ray tasks.

1. scan (one Ray task per shard): token histogram, per-label histograms, where each code occurs;
2. mosaic (one task per shard that holds a wanted patch): image patches of the most/least used codes;
3. agreement (tokenizer given; a few shards): rebuild the cached views, re-encode them, and
   re-assign the encoder's features to the codebook with FAISS; compare with the cached tokens;
4. geometry (tokenizer given; driver): FAISS nearest codes, near-duplicates, k-means;
5. outputs: report.json, codes.parquet, PNGs, report.html (see ``eval.codebook.outputs``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from eval.codebook import scan, stats
from eval.codebook.agreement import pick_agreement_shards, run_agreement  # noqa: F401 (API)
from eval.codebook.geometry import run_geometry
from eval.codebook.ray_util import gather, remote
from pipeline import storage
from pipeline.errors import StageError
from pipeline.token_cache import MANIFEST, CacheError, CacheInfo, check_cache, shard_urls


def resolve_cache_dir(location: str) -> str:
    """The cache itself, or a ``tokens/`` folder holding exactly one cache."""
    location = str(location)
    if not storage.exists(location):
        raise CacheError(f"token cache not found: {location}")
    if storage.exists(storage.join(location, MANIFEST)):
        return location
    inner = [n for n in storage.list_names(location) if storage.exists(storage.join(location, n, MANIFEST))]
    if len(inner) == 1:
        return storage.join(location, inner[0])
    if len(inner) > 1:
        raise CacheError(f"{location} holds {len(inner)} token caches ({', '.join(inner)}); pass one of them")
    return location  # check_cache says what is missing


def load_checked_tokenizer(tokenizer_dir: str, info: CacheInfo, vocab_size: int):
    try:
        from tokenizer.checkpoint import load_tokenizer
    except ImportError as e:  # pragma: no cover - the tokenizer package is a sibling stage
        raise StageError(f"cannot load tokenizers: {e}") from None
    try:
        tok = load_tokenizer(tokenizer_dir)
    except (FileNotFoundError, ValueError, OSError, KeyError) as e:
        raise StageError(f"cannot load tokenizer {tokenizer_dir}: {e}") from None
    if int(tok.vocab_size) != vocab_size:
        raise StageError(
            f"tokenizer {tokenizer_dir} ({tok.tokenizer_id}) has a vocabulary of {tok.vocab_size} codes but the cache "
            f"was made with {vocab_size} (tokenizer {info.tokenizer_id}): pass the tokenizer that built the cache"
        )
    return tok


class Scan:
    """Driver-side aggregation of ``scan.scan_shard`` results."""

    def __init__(self, n_shards: int, k: int, occurrences: int):
        self.k, self.m = k, occurrences
        self.counts = np.zeros(k, dtype=np.int64)
        self.shard_counts: list[np.ndarray | None] = [None] * n_shards
        self.shard_meta: list[dict[str, Any] | None] = [None] * n_shards
        self.labels: dict[int, np.ndarray] = {}
        self.occ = np.full((k, max(occurrences, 1), 5), -1, dtype=np.int64)  # shard, sample, view, y, x
        self.have = np.zeros(k, dtype=np.int64)
        self.grids: set = set()
        self.out_of_range = 0

    def add(self, i: int, r: dict[str, Any]) -> None:
        self.counts += r["counts"]
        self.shard_counts[i] = r["counts"].astype(np.int32 if r["tokens"] < 2**31 else np.int64)
        self.shard_meta[i] = {"samples": r["samples"], "views": r["views"], "tokens": r["tokens"]}
        self.grids.update(tuple(g) for g in r["grids"])
        self.out_of_range += r["out_of_range"]
        for label, (codes, cnt) in r["labels"].items():
            row = self.labels.setdefault(label, np.zeros(self.k, dtype=np.int64))
            row[codes] += cnt
        occ = r["occ"]
        if occ.size and self.m:
            codes = occ[:, 0].astype(np.int64)
            rank = np.arange(codes.size) - np.searchsorted(codes, codes, side="left")
            slot = self.have[codes] + rank
            keep = slot < self.m
            self.occ[codes[keep], slot[keep]] = np.column_stack([np.full(keep.sum(), i), occ[keep, 1:]])
            self.have = np.minimum(self.m, self.have + np.bincount(codes, minlength=self.k))


def choose_mosaic_codes(counts: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """The ``n`` most used codes, and the ``n`` least used codes that are still used (ties: lower id)."""
    order = np.lexsort((np.arange(counts.size), -counts))
    most = [int(c) for c in order[:n] if counts[c] > 0]
    live = np.flatnonzero(counts > 0)
    least_order = live[np.lexsort((live, counts[live]))]
    least = [int(c) for c in least_order if int(c) not in most][:n]
    return most, least


def run_mosaic(sc: Scan, urls: list[str], codes: list[int], input_size: int, grid: tuple[int, int], quiet: bool) -> dict[int, list[np.ndarray]]:
    requests: dict[int, list[tuple[int, tuple[int, int, int, int]]]] = {}
    for code in codes:
        for shard, s, v, y, x in sc.occ[code]:
            if shard >= 0:
                requests.setdefault(int(shard), []).append((code, (int(s), int(v), int(y), int(x))))
    task = remote(scan.render_patches, num_cpus=1)
    shards = sorted(requests)
    refs = [task.remote(urls[s], np.array([r for _, r in requests[s]], dtype=np.int64), input_size, grid) for s in shards]
    patches: dict[int, list[np.ndarray]] = {c: [] for c in codes}

    def on_result(i: int, result: list[np.ndarray]) -> None:
        for (code, _), patch in zip(requests[shards[i]], result):
            patches[code].append(patch)

    gather(refs, on_result, "mosaic", quiet)
    return patches


def codebook_report(
    cache_dir: str,
    out_dir: str,
    tokenizer_dir: str | None = None,
    source: str | None = None,
    compare: str | None = None,
    sample: int = 256,
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    duplicate_threshold: float = 0.95,
    clusters: int | None = None,
    mosaic_codes: int = 8,
    mosaic_patches: int = 8,
    use_gpu: bool | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write the report into ``out_dir`` and return it (the content of report.json, plus ``outputs``)."""
    from eval.codebook import outputs
    from pipeline.ray_context import ray_session

    t0 = time.perf_counter()
    cache_dir = resolve_cache_dir(cache_dir)
    info, rows = check_cache(cache_dir)
    k = info.vocab_size
    tok = None
    if tokenizer_dir is not None:
        if not storage.is_uri(tokenizer_dir):
            tokenizer_dir = storage.resolve(tokenizer_dir)[1]
        tok = load_checked_tokenizer(tokenizer_dir, info, k)
    class_names = info.classes
    source_info = None
    if source is not None:
        from pipeline.sources import open_source

        src = open_source(source)
        fingerprints = sorted({str(r.get("source_fingerprint")) for r in rows})
        source_info = {"spec": source, "fingerprint": src.fingerprint(), "cache_fingerprints": fingerprints,
                       "matches_cache": fingerprints == [src.fingerprint()], "items": len(src)}
        class_names = src.classes or class_names
    urls = shard_urls(cache_dir, rows)
    timing: dict[str, float] = {}
    with ray_session(address, num_cpus):
        t = time.perf_counter()
        sc = Scan(len(urls), k, mosaic_patches if mosaic_codes > 0 else 0)
        task = remote(scan.scan_shard, num_cpus=1)
        gather([task.remote(u, k, sc.m) for u in urls], sc.add, "scan", quiet)
        timing["scan_s"] = time.perf_counter() - t
        if sc.out_of_range:
            raise CacheError(f"{cache_dir}: {sc.out_of_range} cached token ids are >= the vocabulary size {k}; "
                             f"the cache is corrupt or mislabelled: run `mimflow tokens verify {cache_dir}`")
        if sc.counts.sum() == 0:
            raise CacheError(f"token cache {cache_dir} holds no tokens ({sum(m['samples'] for m in sc.shard_meta)} samples)")
        grid = tuple(info.grid)
        input_size = info.input_size
        patches, most, least = {}, [], []
        if mosaic_codes > 0 and input_size and len(sc.grids) == 1:
            t = time.perf_counter()
            most, least = choose_mosaic_codes(sc.counts, mosaic_codes)
            patches = run_mosaic(sc, urls, most + least, int(input_size), tuple(next(iter(sc.grids))), quiet)
            timing["mosaic_s"] = time.perf_counter() - t
        agreement = None
        if tok is not None and sample > 0:
            t = time.perf_counter()
            agreement = run_agreement(tok, tokenizer_dir, urls, rows, sample, quiet, use_gpu)
            timing["agreement_s"] = time.perf_counter() - t
    geometry, columns, skipped = None, {}, None
    if tok is not None:
        t = time.perf_counter()
        try:
            codebook = np.asarray(tok.codebook().detach().cpu().numpy(), dtype=np.float32)
        except NotImplementedError:
            codebook, skipped = None, f"tokenizer kind {tok.kind!r} has no code vectors"
        if codebook is not None:
            geometry, columns = run_geometry(codebook, sc.counts, duplicate_threshold, clusters, use_gpu)
        timing["geometry_s"] = time.perf_counter() - t
    elif tokenizer_dir is None:
        hint = f" (the cache info names {info.tokenizer_dir})" if info.tokenizer_dir else ""
        skipped = f"no --tokenizer given: codebook geometry and agreement need the tokenizer{hint}"
    drift = stats.shard_drift(sc.shard_counts, sc.counts)
    baselines: dict[int, float] = {}  # by shard size: most shards of a cache have the same size
    for m in sc.shard_meta:
        if m["tokens"] not in baselines:
            baselines[m["tokens"]] = stats.drift_baseline(m["tokens"], sc.counts)
    chance = [baselines[m["tokens"]] for m in sc.shard_meta]
    # drifting: beyond twice what chance gives a shard of its size, and beyond twice the median shard
    # (one odd shard moves the whole, so every other shard then differs from it a little too)
    median = float(np.median(drift))
    flagged = [i for i, (d, b) in enumerate(zip(drift, chance)) if d > 2 * max(b, median) + 0.01]
    names = [u.rsplit("/", 1)[-1] for u in urls]
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cache": {
            "path": cache_dir, "tokenizer_id": info.tokenizer_id, "kind": info.kind,
            "shards": len(urls), "samples": int(sum(m["samples"] for m in sc.shard_meta)),
            "views": int(sum(m["views"] for m in sc.shard_meta)), "grid": list(grid), "input_size": input_size,
        },
        "tokenizer": None if tok is None else {
            "path": tokenizer_dir, "tokenizer_id": tok.tokenizer_id, "kind": tok.kind,
            "matches_cache": tok.tokenizer_id == info.tokenizer_id,
        },
        "source": source_info,
        "usage": stats.usage_figures(sc.counts),
        "usage_curve": stats.usage_curve(sc.counts),
        "usage_histogram": dict(zip(*stats.log_bins(sc.counts))),
        "dead_code_ids": np.flatnonzero(sc.counts == 0).tolist(),
        "shards": {
            "drift_mean": float(np.mean(drift)), "drift_max": float(np.max(drift)),
            "drift_max_shard": names[int(np.argmax(drift))],
            "drift_chance_mean": float(np.mean(chance)),
            "drifting_shards": [names[i] for i in flagged],
            "per_shard": [{"shard": n, **m, "drift_js_bits": d, "drift_by_chance": b, "codes_used": int((c > 0).sum())}
                          for n, m, d, b, c in zip(names, sc.shard_meta, drift, chance, sc.shard_counts)],
        },
        "classes": stats.per_class_figures(np.stack([sc.labels.get(i, np.zeros(k, np.int64)) for i in range(max(sc.labels) + 1)]), class_names)
        if sc.labels else None,
        "geometry": geometry,
        "geometry_skipped": skipped,
        "agreement": agreement,
        "mosaic": {"most_used": most, "least_used": least},
    }
    return outputs.write_all(report, sc, columns, patches, out_dir, compare, timing, t0, quiet)
