"""Completion records of the token-cache build: what lets a rerun skip, or reuse, finished shards.

A partition's record ``_build/part-<index>-<digest>.json`` is written after its shard. The digest
covers the partition's content (keys, labels, sha256 of every image's bytes) and the parameters its
tokens depend on (tokenizer, input size, views, seed, view style), so a record names exactly the shard that the
same input would produce again. ``shard_current`` is the one rule deciding whether a record's shard
may be kept: the same cache format (sample layout), the same build parameters, the same content, and the shard file's sha256 equal to the
record's (content, never size: a file name can be reused for other bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from pipeline import storage
from pipeline.views import ViewStyle

BUILD_DIR = "_build"  # per-partition completion records
RECORD = re.compile(r"part-\d{6}-[0-9a-f]{16}\.json")
RECORD_TEMPORARY = re.compile(RECORD.pattern + r"\.tmp-[0-9a-f]{8}")
DIGEST_VERSION = "mimflow-cache-v1"


@dataclass(frozen=True)
class BuildParams:
    """Everything a worker needs; plain values so it pickles cheaply to every actor."""

    tokenizer_dir: str
    tokenizer_id: str
    source_spec: str
    source_fingerprint: str
    cache_dir: str
    views: int
    seed: int
    batch_size: int
    partitions: int  # the cache's partition count (fixed for its life)
    committed: frozenset = frozenset()  # shard names the committed manifest lists
    style: ViewStyle = ViewStyle()  # how views are drawn and rendered (crop scale, jitter, interpolations)


# Every file name a build writes in a cache directory (and their temporaries): the only ones gc removes.
OWN_FILE = re.compile(r"(shard-\d{6}(-[0-9a-f]{12})?\.tar|errors-[0-9a-f]{16}\.parquet|manifest\.parquet)")
TEMPORARY = re.compile(OWN_FILE.pattern + r"\.tmp-[0-9a-f]{8}")
LEGACY = ("cache.json", "errors.parquet")  # written by mimflow before the cache info moved into the manifest


def remove_temporaries(cache_dir: str) -> list[str]:
    """Remove the temporary files a killed writer left (ours only); returns their paths."""
    removed = []
    for folder, pattern in ((cache_dir, TEMPORARY), (storage.join(cache_dir, BUILD_DIR), RECORD_TEMPORARY)):
        for name in storage.list_names(folder):
            if pattern.fullmatch(name):
                path = storage.join(folder, name)
                storage.remove(path)
                removed.append(path)
    return removed


def record_name(index: int, digest: str) -> str:
    return f"part-{index:06d}-{digest[:16]}.json"


def replacement_shard_name(index: int, digest: str) -> str:
    return f"shard-{index:06d}-{digest[:12]}.tar"


def partition_digest(items: Iterable, params: BuildParams, input_size: int) -> str:
    """sha256 of a partition's content and the parameters its tokens depend on."""
    from pipeline.sources import Sample

    h = hashlib.sha256(f"{DIGEST_VERSION}\n{params.tokenizer_id}\n{input_size}\n{params.views}\n{params.seed}\n".encode())
    if params.style.key():  # the default style adds nothing: digests of caches made before styles still match
        h.update(f"style\t{params.style.key()}\n".encode())
    for item in items:
        if isinstance(item, Sample):
            line = f"S\t{item.key}\t{item.fmt}\t{item.label}\t{hashlib.sha256(item.data).hexdigest()}\n"
        else:
            line = f"B\t{item.key}\t{item.reason}\n"
        h.update(line.encode())
    return h.hexdigest()


def load_records(cache_dir: str) -> list[dict[str, Any]]:
    """Every completion record (unreadable ones, e.g. from an old format, are ignored)."""
    out = []
    build = storage.join(cache_dir, BUILD_DIR)
    for name in storage.list_names(build):
        if not name.endswith(".json") or ".tmp-" in name:
            continue
        try:
            rec = json.loads(storage.read_bytes(storage.join(build, name)))
        except (OSError, ValueError):
            continue
        rec["_record"] = name
        out.append(rec)
    return out


def write_record(cache_dir: str, rec: dict[str, Any]) -> None:
    rec = {k: v for k, v in rec.items() if not k.startswith("_")}
    path = storage.join(cache_dir, BUILD_DIR, record_name(rec["partition"], rec["digest"]))
    storage.write_bytes_atomic(path, json.dumps(rec, indent=1, sort_keys=True).encode())


def shard_current(rec: dict[str, Any], params: BuildParams, digest: str | None = None) -> bool:
    """Whether a finished partition's record (and its shard) is current and may be kept.

    With ``digest`` (the partition was read): the record must be of exactly this content. Without
    (the driver, before reading anything): of the same source fingerprint. Either way the build
    parameters must match and the shard file's sha256 must be the record's.
    """
    from pipeline.token_cache import CACHE_FORMAT, file_sha256

    # a shard of another sample layout (an old cache being refreshed) is rebuilt, never kept
    same = (rec.get("format"), rec.get("tokenizer_id"), rec.get("views"), rec.get("seed"), rec.get("partitions"),
            rec.get("view_style", "")) == (
        CACHE_FORMAT,
        params.tokenizer_id,
        params.views,
        params.seed,
        params.partitions,
        params.style.key(),
    )
    if not same:
        return False
    if digest is not None and rec.get("digest") != digest:
        return False
    if digest is None and rec.get("source_fingerprint") != params.source_fingerprint:
        return False
    shard = rec.get("shard")
    if shard is None:
        return rec.get("samples") == 0
    loc = storage.join(params.cache_dir, shard)
    return storage.exists(loc) and file_sha256(loc) == rec.get("sha256")
