"""Feature extraction at scale: Ray actors over source partitions; the driver gathers only features.

``extract_features(encoders, spec, ...)`` returns one ``FeatureSet`` per encoder, from the feature
cache (``eval.features.cache_entry``: encoder id x source spec + fingerprint x pooling x layer) when
the entry is complete. Otherwise:

* **Plan**: the source's partitions (``source.partitions()``); a partition is to do for an encoder
  when its part file (``eval.feature_worker``) is missing from the entry's ``parts/``, so a rerun
  after a kill reuses every finished partition.
* **Work**: a pool of ``FeatureWorker`` Ray actors (one per CPU, each with its share of the threads,
  or one per GPU), each holding every encoder: an image is decoded once for the pretrained encoder
  and the random-init baseline. ``workers=0`` runs the same worker in this process, partition by
  partition (small sources, tests). A progress line every ``progress_every`` partitions.
* **Commit**: the parts are read, put back in the source's listing order, concatenated, and
  written as the entry's ``features.npy`` + ``index.parquet`` + ``meta.json`` (last); then the parts
  are removed. The driver's memory holds N x D floats and the labels, never images.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from eval.eval_config import EvalError
from eval.feature_worker import PARTS_DIR, EncoderRef, FeatureWorker, part_name, read_part
from eval.features import (
    CACHE_FORMAT,
    Encoder,
    FeatureSet,
    cache_entry,
    listing_order,
    open_labelled,
    read_entry,
    write_entry,
)
from pipeline import storage
from pipeline.cluster_fit import cpus_per_actor
from pipeline.progress import Progress


class LazyRay:
    """Starts (or joins) Ray on first ``ensure()``, until the ``with`` block ends: a run whose
    features all come from the cache starts no Ray."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address, self.num_cpus = address, num_cpus
        self._stack = contextlib.ExitStack()
        self._entered = False

    def ensure(self) -> None:
        if not self._entered:
            from pipeline.ray_context import ray_session

            self._stack.enter_context(ray_session(self.address, self.num_cpus))
            self._entered = True

    def __enter__(self) -> "LazyRay":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def extract_features(
    encoders: list[Encoder],
    spec: str,
    *,
    cache_dir: str,
    pooling: str = "mean",
    layer: int | None = None,
    batch_size: int = 128,
    workers: int | None = None,
    ray: LazyRay | None = None,
    progress_every: int = 10,
    log: Callable[[str], None] | None = None,
) -> dict[str, FeatureSet]:
    """Features of every labelled image of ``spec`` for each encoder (by ``encoder.name``)."""
    log = log or (lambda msg: print(f"eval: {msg}", file=sys.stderr, flush=True))
    source = open_labelled(spec)
    fingerprint = source.fingerprint()
    out: dict[str, FeatureSet] = {}
    entries: dict[str, str] = {}
    same_as: dict[str, str] = {}  # encoder name -> the name whose entry it shares (identical weights)
    for enc in encoders:
        entry = cache_entry(cache_dir, enc, spec, fingerprint, pooling, layer)
        first = next((name for name, e in entries.items() if e == entry), None)
        hit = None if first else read_entry(entry)
        if first:
            same_as[enc.name] = first
        elif hit is not None:
            out[enc.name] = hit
        else:
            entries[enc.name] = entry
    if not entries:
        return out

    t0 = time.perf_counter()
    parts = source.partitions()
    names = {p.index: part_name(p) for p in parts}
    finished = {name: set(storage.list_names(storage.join(e, PARTS_DIR))) for name, e in entries.items()}
    jobs: dict[int, dict[str, str]] = {}
    for p in parts:
        todo = {name: storage.join(entries[name], PARTS_DIR, names[p.index])
                for name in entries if names[p.index] not in finished[name]}
        if todo:
            jobs[p.index] = todo
    todo_parts = [p for p in parts if p.index in jobs]
    log(f"features of {spec!r} ({len(source)} items, {len(parts)} partitions) for "
        f"{', '.join(entries)}: {len(parts) - len(todo_parts)} partitions already done")
    stats: dict[str, float] = {}
    if todo_parts:
        progress = Progress("eval: features", len(parts), sum(p.size for p in todo_parts),
                            done=len(parts) - len(todo_parts), every=progress_every)
        if workers == 0:
            worker = FeatureWorker(spec, encoders, pooling, layer, batch_size)  # the encoders as they are
            progress.restart_clock()
            for p in todo_parts:
                rec = worker.run(p, jobs[p.index])
                progress.update(rec["images"], p.size)
        else:
            with contextlib.ExitStack() as stack:  # a Ray started here for this call stops with it
                (ray or stack.enter_context(LazyRay())).ensure()
                args = (spec, [EncoderRef.of(enc) for enc in encoders], pooling, layer, batch_size)
            stats = _run_actors(args, todo_parts, jobs, workers, progress, log)
        progress.finish()
        if open_labelled(spec).fingerprint() != fingerprint:  # finished parts are kept for the rerun
            raise EvalError(f"source {spec!r} changed during feature extraction; rerun to extract it again")

    for enc in encoders:
        if enc.name not in entries:
            continue
        fs = _commit(enc, entries[enc.name], spec, fingerprint, pooling, layer, source, parts, names)
        fs.seconds = time.perf_counter() - t0
        fs.stats = stats
        out[enc.name] = fs
    for name, first in same_as.items():
        out[name] = out[first]
    return out


def _run_actors(args: tuple, todo: list, jobs: dict[int, dict[str, str]], workers: int | None,
                progress: Progress, log: Callable[[str], None]) -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    n = workers or (int(gpus) if gpus >= 1 else max(1, int(cpus)))
    n = max(1, min(n, len(todo)))
    opts: dict[str, Any] = {"max_restarts": 3, "max_task_retries": 3}
    if gpus:
        opts["num_gpus"] = 1 if gpus >= n else gpus / n
        threads = None
        opts["num_cpus"] = 1
    else:
        n = min(n, max(1, int(cpus)))  # actors hold their CPUs for life: more would never be scheduled
        threads = cpus_per_actor(cpus, n)
        opts["num_cpus"] = threads
    t0 = time.perf_counter()
    Worker = ray.remote(FeatureWorker).options(**opts)
    actors = [Worker.remote(*args, threads=threads) for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])
    startup = time.perf_counter() - t0
    log(f"{len(todo)} partitions on {n} actor(s) "
        f"({'GPU' if gpus else f'CPU, {threads} thread(s) each'}), started in {startup:.1f}s")
    progress.restart_clock()
    queue = deque(todo)
    inflight: dict = {}

    def submit(actor) -> None:
        if queue:
            p = queue.popleft()
            inflight[actor.run.remote(p, jobs[p.index])] = (actor, p)

    for _ in range(2):  # two per actor: the next partition is queued while one runs
        for actor in actors:
            submit(actor)
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                actor, p = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise EvalError(f"features of partition {p.index} of {args[0]!r} failed: {e.cause}") from None
                except ray.exceptions.RayActorError as e:
                    raise EvalError(f"features of partition {p.index}: its worker died (after retries): {e}") from None
                progress.update(rec["images"], p.size)
                submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return {"actors": n, "startup_s": startup, "extract_s": time.perf_counter() - progress.t0}


def _commit(enc: Encoder, entry: str, spec: str, fingerprint: str, pooling: str, layer: int | None,
            source, parts: list, names: dict[int, str]) -> FeatureSet:
    """Join the parts in the source's listing order, write the cache entry (meta.json last), drop the parts."""
    feats, labels, keys, skipped = [], [], [], []
    paths = [storage.join(entry, PARTS_DIR, names[p.index]) for p in parts]
    for path in paths:
        f, y, k, s = read_part(path)
        feats.append(f)
        labels.append(y)
        keys += k
        skipped += s
    if not keys:
        raise EvalError(f"source {spec!r} has no readable labelled images ({len(skipped)} skipped)")
    order = listing_order(source, keys)
    fs = FeatureSet(np.concatenate(feats)[order], np.concatenate(labels)[order], [keys[i] for i in order],
                    list(source.classes or []), False, entry, 0.0, len(skipped))
    meta = {
        "format": CACHE_FORMAT,
        "encoder_id": enc.encoder_id,
        "encoder": enc.location,
        "source": spec,
        "source_fingerprint": fingerprint,
        "pooling": pooling,
        "layer": layer,
        "count": len(keys),
        "dim": int(fs.features.shape[1]),
        "classes": fs.classes,
        "skipped": len(skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_entry(entry, fs, meta)
    for path in paths:  # the entry holds them now; a kill here leaves a complete entry and some parts
        storage.remove(path)
    storage.remove(storage.join(entry, PARTS_DIR))
    return fs
