"""The token-cache worker: one Ray actor holds the tokenizer and turns partitions into shards.

For a partition: read its items, compute its digest and keep an earlier shard of the same content
(``cache_records``); otherwise decode each image once, render its V views at the tokenizer's input
size, encode the views in batches (on the actor's GPU when it has one, with decoding overlapped on
threads), write the shard atomically, then its completion record.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline import storage
from pipeline.token_cache import CACHE_FORMAT, SAMPLE_MEMBER, CacheError, encode_sample, shard_name, write_shard
from tokenizer.cache_records import (
    BUILD_DIR,
    BuildParams,
    partition_digest,
    record_name,
    replacement_shard_name,
    shard_current,
    write_record,
)


@dataclass
class _Prepared:
    key: str
    data: bytes
    fmt: str
    label: int | None
    width: int
    height: int
    views: list
    pixels: np.ndarray | None  # uint8 [V, S, S, 3]
    error: tuple[str, str] | None = None  # (origin, reason)


def _prepare(item, num_views: int, seed: int, size: int, style) -> _Prepared:
    """Decode once, draw the views, render each at the tokenizer's input size (uint8 HWC)."""
    from pipeline.images import BadImageError, decode_rgb
    from pipeline.sources import BadInput
    from pipeline.views import make_views, render_view

    if isinstance(item, BadInput):
        return _Prepared(item.key, b"", "", None, 0, 0, [], None, (item.origin, item.reason))
    try:
        img = decode_rgb(item.data)
    except BadImageError as e:
        return _Prepared(item.key, b"", "", None, 0, 0, [], None, (item.origin, e.reason))
    views = make_views(item.key, img.width, img.height, num_views, seed=seed, style=style)
    # np.asarray(render_view(...)) is exactly what pipeline.images.to_tensor starts from.
    pixels = np.stack([np.asarray(render_view(img, v, size, "tokenizer"), dtype=np.uint8) for v in views])
    return _Prepared(item.key, item.data, item.fmt, item.label, img.width, img.height, views, pixels)


def _prefetch(fn, items: list, threads: int, depth: int) -> Iterator:
    """``map(fn, items)`` in order, at most ``depth`` items ahead, on ``threads`` threads."""
    if threads <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="cache-prep") as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        for item in it:
            yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()


class PartitionEncoder:
    """The work of one actor, usable without Ray (tests, the benchmark's profile)."""

    def __init__(self, params: BuildParams, device: str = "cpu", prep_threads: int = 1):
        import torch

        from pipeline.sources import open_source
        from tokenizer.checkpoint import load_tokenizer

        self.params = params
        self.device = torch.device(device)
        self.tok = load_tokenizer(params.tokenizer_dir)
        tok_id = self.tok.tokenizer_id
        if tok_id != params.tokenizer_id:
            raise CacheError(
                f"tokenizer at {params.tokenizer_dir} is now {tok_id}, the build started with "
                f"{params.tokenizer_id}: it changed during the build; rerun"
            )
        self.tok = self.tok.to(self.device).eval()
        self.source = open_source(params.source_spec)  # listed once per actor
        if self.source.fingerprint() != params.source_fingerprint:
            raise CacheError(f"source {params.source_spec!r} changed since the build started; rerun to pick it up")
        self.parts = self.source.partitions(params.partitions)  # once: assignment hashes every key
        self.prep_threads = prep_threads

    def _check_source(self, part):
        if part.index >= len(self.parts) or self.parts[part.index] != part:
            raise CacheError(f"partition {part.index} of {self.params.source_spec!r} differs from the driver's plan")
        return self.parts[part.index]

    def encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> uint16 [N, h, w]; the float conversion matches ``to_tensor``."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            tokens = self.tok.encode(x)
        return tokens.to("cpu").numpy().astype(np.uint16)

    def encode_items(self, items: list) -> tuple[list[dict[str, bytes]], list[dict[str, str]], int]:
        """(shard samples in source order, error rows, images encoded)."""
        size, bs = int(self.tok.input_size), max(1, self.params.batch_size)
        prepared = _prefetch(
            lambda it: _prepare(it, self.params.views, self.params.seed, size, self.params.style),
            items,
            self.prep_threads,
            depth=2 * bs,
        )
        samples: list[dict[str, bytes]] = []
        errors: list[dict[str, str]] = []
        group: list[_Prepared] = []
        n_views = 0

        def flush():
            nonlocal n_views
            if not group:
                return
            tokens = self.encode_batch(np.concatenate([p.pixels for p in group]))
            offset = 0
            for p in group:
                v = len(p.views)
                samples.append(
                    encode_sample(p.key, p.data, p.fmt, tokens[offset : offset + v], p.width, p.height, p.views, p.label)
                )
                offset += v
            group.clear()
            n_views = 0

        images = 0
        for p in prepared:
            if p.error is not None:
                errors.append({"key": p.key, "source": p.error[0], "reason": p.error[1]})
                continue
            if n_views + len(p.views) > bs and group:
                flush()
            group.append(p)
            n_views += len(p.views)
            images += 1
        flush()
        return samples, errors, images

    def run(self, part) -> dict[str, Any]:
        """Build (or reuse) the shard of ``part`` (a ``Partition``); returns its completion record."""
        params = self.params
        part = self._check_source(part)
        index = part.index
        items = list(self.source.iter_partition(part))
        digest = partition_digest(items, params, int(self.tok.input_size))
        reused = self._reuse(part, digest)
        if reused is not None:
            return reused
        t0 = time.perf_counter()
        samples, errors, images = self.encode_items(items)
        shard = None
        count, nbytes, sha = 0, 0, None
        if samples:
            shard = shard_name(index)
            if shard in params.committed:  # never overwrite what the committed manifest lists
                shard = replacement_shard_name(index, digest)
            count, nbytes, sha = write_shard(storage.join(params.cache_dir, shard), samples)
        rec = self._record(part, digest, shard, count, nbytes, sha, errors)
        # the source image members' share of the shard: the rest is the cache's own overhead
        image_bytes = sum(len(v) for s in samples for k, v in s.items() if k not in ("__key__", SAMPLE_MEMBER))
        rec.update(image_bytes=image_bytes, images=images, encode_s=round(time.perf_counter() - t0, 3), reused=False)
        write_record(params.cache_dir, rec)  # after the shard: a record always names a complete shard
        return rec

    def _record(self, part, digest, shard, count, nbytes, sha, errors) -> dict[str, Any]:
        p = self.params
        return {
            "format": CACHE_FORMAT,  # the sample layout its shard has
            "partition": part.index,
            "partitions": p.partitions,
            "digest": digest,
            "shard": shard,
            "samples": count,
            "bytes": nbytes,
            "sha256": sha,
            "errors": errors,
            "tokenizer_id": p.tokenizer_id,
            "source_fingerprint": p.source_fingerprint,
            "views": p.views,
            "seed": p.seed,
            "view_style": p.style.key(),
            "created": int(time.time()),
            "worker": {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device)},
        }

    def _reuse(self, part, digest: str) -> dict[str, Any] | None:
        """The record of an earlier build of exactly this content, if its shard still holds it."""
        cache_dir = self.params.cache_dir
        path = storage.join(cache_dir, BUILD_DIR, record_name(part.index, digest))
        if not storage.exists(path):
            return None
        try:
            rec = json.loads(storage.read_bytes(path))
        except ValueError:
            return None
        if rec.get("partition") != part.index or not shard_current(rec, self.params, digest):
            return None
        if rec.get("source_fingerprint") != self.params.source_fingerprint:
            rec.update(source_fingerprint=self.params.source_fingerprint)
            write_record(cache_dir, rec)
        rec.update(images=0, reused=True)
        return rec


class TokenWorker:
    """The Ray actor: one tokenizer per process, partitions one at a time."""

    def __init__(self, params: BuildParams, threads: int):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        # On a GPU the CPU work (decode, crops) overlaps the encode; on CPU it competes with it.
        self.enc = PartitionEncoder(params, device=device, prep_threads=max(2, threads) if device == "cuda" else 0)

    def run(self, part) -> dict[str, Any]:
        return self.enc.run(part)

    def pid(self) -> int:
        return os.getpid()
