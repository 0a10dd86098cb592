"""Build the offline token cache: one Ray job, one shard per source partition.

``build_cache(tokenizer_dir, source, out_root)`` writes ``out_root/<tokenizer_id>/`` (the layout and
the contract are in ``pipeline.token_cache``) and returns a ``BuildReport``. The driver plans, a pool of
Ray actors does the work:

* **Units of work** are the source's partitions; partition ``i`` becomes one shard. An item belongs
  to partition ``hash(key) % P``, with ``P`` fixed for the cache's life (``CacheInfo.partitions``), so
  inserting, deleting or changing k images makes at most k partitions stale.
  Each actor loads the tokenizer once (on a GPU when the cluster has one), reopens the source from
  its spec string, and for a partition: reads its items, decodes each image once, renders its ``V``
  views (``pipeline.views``), encodes them in batches, and writes the shard atomically. Bad inputs
  (unreadable items, undecodable images) become error rows, so built + errors = source size.
* **Resume**: a finished partition leaves a record ``_build/part-<index>-<digest>.json`` (written
  after its shard) naming the shard, its sample count, size, sha256 and errors. The digest covers
  the partition's content (keys, labels, sha256 of every image's bytes) and the build parameters.
  A rerun skips partitions whose record matches the current source fingerprint without reading
  them; after a source change the actors re-read each partition and reuse a shard whose digest is
  unchanged, so only stale partitions are re-encoded. Either way a shard is kept only if its file's
  sha256 is the record's (``cache_records.shard_current``). ``kill -9`` at any moment loses at most
  the partitions in flight.
* **Commit**: the errors file (named by its content) is written, then ``manifest.parquet``, carrying
  the ``CacheInfo``, last and atomically: the one commit point. A shard that replaces one the committed manifest still lists is written under a new
  name (``shard-<index>-<digest>.tar``), so the previous cache stays readable, byte for byte, until
  the new manifest is committed; ``mimflow tokens refresh --gc`` removes what is no longer listed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline import storage
from pipeline.cluster_fit import check_shared_paths, cpus_per_actor
from pipeline.progress import Progress
from pipeline.sources import parse_spec
from pipeline.token_cache import (
    CACHE_FORMAT,
    MANIFEST,
    CacheError,
    CacheInfo,
    commit_cache,
    errors_name,
    read_cache_info,
    read_manifest,
)
from pipeline.views import ViewStyle
from tokenizer.cache_records import BuildParams, load_records, remove_temporaries, shard_current
from tokenizer.cache_worker import TokenWorker


@dataclass
class BuildReport:
    cache_dir: str
    tokenizer_id: str
    partitions: int
    encoded: int = 0  # partitions encoded in this run
    reused: int = 0  # partitions whose finished shard was kept (resume or unchanged content)
    samples: int = 0
    errors: int = 0
    images: int = 0  # source images encoded in this run
    seconds: float = 0.0  # the whole build
    startup_s: float = 0.0  # starting the actors (each loads the tokenizer, opens the source)
    encode_s: float = 0.0  # from the actors being ready to the last shard
    up_to_date: bool = False  # nothing to do: the committed cache already matched

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# -------------------------------------------------------------------------------------------- driver


def _default_actors(gpus: float, cpus: float) -> int:
    if gpus >= 1:
        return int(gpus)
    return max(1, int(cpus))


def _run_pool(
    params: BuildParams, todo: list, num_actors: int | None, progress: Progress
) -> tuple[dict[int, dict], float]:
    """(completion record per partition index, seconds the actors took to start)."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    n = max(1, min(num_actors or _default_actors(gpus, cpus), len(todo)))
    if not gpus:
        n = min(n, max(1, int(cpus)))  # actors hold their CPUs for life: more would never be scheduled
    threads = cpus_per_actor(cpus, n)  # each actor reserves its share and uses that many threads
    opts: dict[str, Any] = {"max_restarts": 3, "max_task_retries": 3, "num_cpus": threads}
    if gpus:
        opts["num_gpus"] = 1 if gpus >= n else gpus / n
        # Two partitions at a time per GPU actor: one is read and decoded while the other encodes.
        opts["max_concurrency"] = 2
    Worker = ray.remote(TokenWorker).options(**opts)
    t0 = time.perf_counter()
    actors = [Worker.remote(params, threads) for _ in range(n)]
    ray.get([a.pid.remote() for a in actors])  # started, tokenizer loaded, source opened
    startup_s = time.perf_counter() - t0
    print(
        f"tokens: {len(todo)} partitions on {n} actor(s) "
        f"({'GPU ' + format(opts['num_gpus'], 'g') + ' each' if gpus else f'CPU, {threads} thread(s) each'}), "
        f"started in {startup_s:.1f}s",
        flush=True,
    )
    progress.restart_clock()  # rates and ETA from here on
    queue = deque(todo)
    inflight: dict = {}
    results: dict[int, dict] = {}

    def submit(actor):
        if queue:
            part = queue.popleft()
            inflight[actor.run.remote(part)] = (actor, part)

    for _ in range(opts.get("max_concurrency", 1) + 1):  # one more per actor than it runs at once: no idle gap
        for actor in actors:
            submit(actor)
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=progress.every_s)
            if not ready:
                progress.tick()
                continue
            for ref in ready:
                actor, part = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    # e.cause is the worker's own exception: its message, not Ray's remote traceback
                    raise CacheError(f"partition {part.index} failed: {e.cause}") from None
                except ray.exceptions.RayActorError as e:
                    raise CacheError(f"partition {part.index}: its worker died (after retries): {e}") from None
                results[part.index] = rec
                progress.update(rec.get("images", 0), part.size)
                submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results, startup_s


def _committed(cache_dir: str) -> tuple[CacheInfo | None, list[dict[str, Any]]]:
    """The committed cache info (of this format or the one before: a refresh rebuilds it with the same
    partitions, views and seed) and manifest rows; (None, rows) for a manifest older still."""
    if not storage.exists(storage.join(cache_dir, MANIFEST)):
        return None, []
    rows = read_manifest(cache_dir)
    try:
        return read_cache_info(cache_dir, any_format=True), rows
    except CacheError:
        return None, rows  # rebuilt from scratch; its shards are still never overwritten


def _partition_count(info: CacheInfo | None, records: list[dict[str, Any]], source) -> int:
    """Fixed for a cache's life: the committed one, else an interrupted first build's, else the default."""
    if info is not None:
        return info.partitions
    counts = [r["partitions"] for r in sorted(records, key=lambda r: r.get("created", 0)) if isinstance(r.get("partitions"), int)]
    return counts[-1] if counts else source.default_partitions()


def build_cache(
    tokenizer_dir: str,
    source_spec: str,
    out_root: str,
    views: int = 1,
    *,
    batch_size: int = 64,
    num_actors: int | None = None,
    seed: int = 0,
    address: str | None = None,
    num_cpus: int | None = None,
    progress_every: float = 5.0,
    style: ViewStyle | None = None,
) -> BuildReport:
    """Build (or resume, or bring up to date) the token cache ``out_root/<tokenizer_id>``; says what was done."""
    from pipeline.ray_context import ray_session
    from pipeline.sources import open_source
    from tokenizer.checkpoint import load_tokenizer

    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    style = style or ViewStyle()
    t0 = time.perf_counter()
    tokenizer_dir = str(tokenizer_dir) if storage.is_uri(tokenizer_dir) else os.path.abspath(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    tok_id = tok.tokenizer_id  # a hash over the weights: computed once
    source = open_source(source_spec)
    fingerprint = source.fingerprint()
    cache_dir = storage.join(out_root, tok_id)
    storage.makedirs(cache_dir)

    info, committed = _committed(cache_dir)
    if info is not None and (info.views, info.seed, info.view_style) != (views, seed, style.key()):
        raise CacheError(
            f"{cache_dir} holds a cache with views={info.views}, seed={info.seed}, view style "
            f"{info.view_style or 'default'!r}; a cache with views={views}, seed={seed}, view style "
            f"{style.key() or 'default'!r} needs another --out (or remove the old one)"
        )
    records = load_records(cache_dir)
    count = _partition_count(info, records, source)
    parts = source.partitions(count)
    params = BuildParams(
        tokenizer_dir=tokenizer_dir,
        tokenizer_id=tok_id,
        source_spec=str(source_spec),
        source_fingerprint=fingerprint,
        cache_dir=cache_dir,
        views=views,
        seed=seed,
        batch_size=batch_size,
        partitions=count,
        committed=frozenset(r["shard"] for r in committed),
        style=style,
    )
    done: dict[int, dict] = {}
    for rec in sorted(records, key=lambda r: r.get("created", 0), reverse=True):  # the newest current one
        i = rec.get("partition")
        if isinstance(i, int) and 0 <= i < count and i not in done and shard_current(rec, params):
            done[i] = rec
    todo = [p for p in parts if p.index not in done]
    report = BuildReport(cache_dir, tok_id, len(parts))
    report.reused = len(done)

    if todo:
        print(
            f"tokens: {source.describe()}; tokenizer {tok_id} ({tok.kind}, vocab {tok.vocab_size}, "
            f"grid {tuple(tok.grid)}, {tok.input_size}px); {views} view(s){' ' + style.key() if style.key() else ''}; {len(done)} of {len(parts)} shards "
            f"already done -> {cache_dir}",
            flush=True,
        )
        progress = Progress("tokens:", len(parts), sum(p.size for p in todo), done=len(done), every=None,
                            every_s=progress_every, parts="shards", stream=sys.stdout)
        with ray_session(address, num_cpus):
            # on several nodes, a local path is each node's own disk: the shards would be split over them
            check_shared_paths([("--out", out_root), ("--tokenizer", tokenizer_dir),
                                ("--source", parse_spec(source_spec)[1] if source.kind != "shapes" else None)])
            results, startup_s = _run_pool(params, todo, num_actors, progress)
        progress.finish()
        report.startup_s = startup_s
        report.encode_s = time.perf_counter() - progress.t0
        if open_source(source_spec).fingerprint() != fingerprint:  # finished shards are kept for the rerun
            raise CacheError(f"source {source_spec!r} changed during the build; rerun to bring the cache up to date")
        for i, rec in results.items():
            if rec.get("reused"):
                report.reused += 1
            else:
                report.encoded += 1
            report.images += rec.get("images", 0)
            done[i] = rec
    new_info, rows, errors = _plan_commit(tok, source, params, parts, done, report)
    encoded = {rec["shard"] for rec in results.values() if not rec.get("reused")} if todo else set()
    _check_shards_in_store(cache_dir, rows, fresh=encoded)
    if (
        info is not None
        and _same_commit(info, committed, new_info, rows)
        and storage.exists(storage.join(cache_dir, info.errors_file))
    ):
        report.up_to_date = True
        print(f"tokens: {cache_dir} is up to date ({len(parts)} shards, {report.samples} samples); nothing to do")
    else:
        commit_cache(cache_dir, new_info, rows, errors)  # the manifest last: the commit point
        print(
            f"tokens: committed {cache_dir}: {report.samples} samples in {len(rows)} shards, {report.errors} "
            f"error(s); {report.encoded} shard(s) encoded, {report.reused} kept",
            flush=True,
        )
    remove_temporaries(cache_dir)  # leftovers of an earlier run killed mid-write; ours are all renamed by now
    report.seconds = time.perf_counter() - t0
    return report


def _check_shards_in_store(cache_dir: str, rows: list[dict[str, Any]], fresh: set[str]) -> None:
    """Before the commit: every listed shard is in the store with its recorded size; the ones written in
    this run also with their recorded sha256 (read back: what the workers wrote is what readers get)."""
    problems = []
    for row in rows:
        location = storage.join(cache_dir, row["shard"])
        try:
            size, _ = storage.stat(location)
        except FileNotFoundError:
            problems.append(f"{row['shard']} is missing")
            continue
        if size != row["bytes"]:
            problems.append(f"{row['shard']} has {size} bytes, the worker wrote {row['bytes']}")
        elif row["shard"] in fresh and hashlib.sha256(storage.read_bytes(location)).hexdigest() != row["sha256"]:
            problems.append(f"{row['shard']} does not have the sha256 the worker wrote")
    if problems:
        raise CacheError(f"not committing {cache_dir}: {'; '.join(problems[:5])}"
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                         + "; on a cluster of several nodes, --out must be storage every node shares (a URI)")


def _same_commit(info: CacheInfo, committed: list[dict], new: CacheInfo, rows: list[dict]) -> bool:
    """The committed cache already is what this build would commit (all but the creation times)."""

    def strip(rs: list[dict]) -> list[dict]:
        return sorted(({k: v for k, v in r.items() if k != "created"} for r in rs), key=lambda r: r["shard"])

    return {**asdict(info), "created": None} == {**asdict(new), "created": None} and strip(committed) == strip(rows)


def _plan_commit(tok, source, params: BuildParams, parts, done: dict[int, dict], report: BuildReport):
    recs = [done[p.index] for p in parts]
    errors = [e for r in recs for e in r["errors"]]
    samples = sum(r["samples"] for r in recs)
    shard_bytes = sum(r["bytes"] for r in recs)
    if samples + len(errors) != len(source):
        raise CacheError(
            f"counts do not add up: {samples} samples + {len(errors)} errors != {len(source)} source items"
        )
    report.samples, report.errors = samples, len(errors)
    created = datetime.now(timezone.utc).replace(microsecond=0)
    rows = [
        {
            "shard": r["shard"],
            "samples": r["samples"],
            "bytes": r["bytes"],
            "sha256": r["sha256"],
            "tokenizer_id": params.tokenizer_id,
            "source_fingerprint": params.source_fingerprint,
            "views": params.views,
            "created": created,
        }
        for r in recs
        if r["shard"]
    ]
    info = CacheInfo(
        format=CACHE_FORMAT,
        tokenizer_id=params.tokenizer_id,
        tokenizer_dir=params.tokenizer_dir,
        kind=tok.kind,
        vocab_size=int(tok.vocab_size),
        grid=[int(g) for g in tok.grid],
        input_size=int(tok.input_size),
        views=params.views,
        seed=params.seed,
        source=params.source_spec,
        source_kind=source.kind,
        source_fingerprint=params.source_fingerprint,
        source_size=len(source),
        partitions=len(parts),
        partition_size=source.partition_size,
        shards=len(rows),
        samples=samples,
        errors=len(errors),
        errors_file=errors_name(errors),
        classes=source.classes,
        created=created.isoformat(),
        shard_bytes=shard_bytes,
        image_bytes=sum(r.get("image_bytes", 0) for r in recs),
        bytes_per_sample=round(shard_bytes / samples, 1) if samples else 0.0,
        view_style=params.style.key(),
    )
    return info, rows, errors


__all__ = ["BuildReport", "build_cache"]
