"""Completion records of the token-cache build: what lets a rerun skip, or reuse, finished shards.

A partition's record ``_build/part-<index>-<digest>.json`` is written after its shard. The digest
covers the partition's content (keys, labels, sha256 of every image's bytes) and the parameters its
tokens depend on (tokenizer, input size, views, seed), so a record names exactly the shard that the
same input would produce again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

from pipeline import storage

BUILD_DIR = "_build"  # per-partition completion records
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
    committed: frozenset = frozenset()  # shard names the committed manifest lists
    delay_s: float = 0.0  # tests only: a pause per partition so a kill lands mid-build


def record_name(index: int, digest: str) -> str:
    return f"part-{index:06d}-{digest[:16]}.json"


def replacement_shard_name(index: int, digest: str) -> str:
    return f"shard-{index:06d}-{digest[:12]}.tar"


def partition_digest(items: Iterable, params: BuildParams, input_size: int) -> str:
    """sha256 of a partition's content and the parameters its tokens depend on."""
    from pipeline.sources import Sample

    h = hashlib.sha256(f"{DIGEST_VERSION}\n{params.tokenizer_id}\n{input_size}\n{params.views}\n{params.seed}\n".encode())
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


def record_current(rec: dict[str, Any], part, params: BuildParams, files: set[str]) -> bool:
    """A record the driver may trust without reading the partition again."""
    return (
        rec.get("partition") == part.index
        and rec.get("start") == part.start
        and rec.get("stop") == part.stop
        and rec.get("source_fingerprint") == params.source_fingerprint
        and rec.get("tokenizer_id") == params.tokenizer_id
        and rec.get("views") == params.views
        and rec.get("seed") == params.seed
        and (rec.get("shard") is None or rec["shard"] in files)
    )
