"""The token cache's on-disk format: WebDataset tar shards plus a Parquet manifest (the contract).

``tokens/<tokenizer_id>/``
    ``shard-000000.tar`` …  one sample = ``<key>.<fmt>`` (source bytes, unchanged), ``<key>.tokens.npy``
                           (uint16 ``[V, h, w]``), ``<key>.views.json``, ``<key>.cls`` when labelled
    ``errors-<digest>.parquet``  inputs that could not be used: key, source, reason (named by content)
    ``manifest.parquet``   one row per shard, and in its metadata the ``CacheInfo`` (what made the cache,
                           which errors file belongs to it); written last and atomically: it is the one
                           commit point, so a reader sees the old cache or the new one, never a mix

Tars are written deterministically (sorted members, zero mtimes and owners), so the same input gives
byte-identical shards and the same sha256 on any machine. Nothing in a shard is pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import CacheError
from pipeline.views import View, views_from_json, views_to_json

MANIFEST = "manifest.parquet"
INFO_KEY = b"mimflow.cache_info"  # the manifest's schema metadata key holding the CacheInfo JSON
CACHE_FORMAT = 2  # 2: CacheInfo inside the manifest, content-named errors file, key-hashed partitions

MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("samples", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("tokenizer_id", pa.string()),
        ("source_fingerprint", pa.string()),
        ("views", pa.int32()),
        ("created", pa.timestamp("s", tz="UTC")),
    ]
)
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def errors_name(errors: list[dict[str, str]]) -> str:
    """The errors file of a commit, named by its content so that an old manifest keeps naming its own."""
    text = json.dumps(sorted((e["key"], e["source"], e["reason"]) for e in errors))
    return f"errors-{hashlib.sha256(text.encode()).hexdigest()[:16]}.parquet"


@dataclass
class CacheInfo:
    """What made a token cache; stored in the manifest's metadata (``write_manifest``/``read_cache_info``)."""

    format: int
    tokenizer_id: str
    tokenizer_dir: str
    kind: str
    vocab_size: int
    grid: list[int]
    input_size: int
    views: int
    seed: int
    source: str
    source_kind: str
    source_fingerprint: str
    source_size: int
    partitions: int  # fixed for the cache's life: items go to partition hash(key) % partitions
    partition_size: int
    shards: int
    samples: int
    errors: int
    errors_file: str
    classes: list[str] | None
    created: str
    view_style: str = ""  # ViewStyle.key(); "" = the default (and what caches made before it had)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "CacheInfo":
        """Parse and type-check; a missing, unknown or mistyped key is a CacheError naming ``where``."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise CacheError(f"{where}: cache info is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise CacheError(f"{where}: cache info is not a JSON object")
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}  # added later: older caches lack them
        missing, unknown = sorted(names - optional - set(doc)), sorted(set(doc) - names)
        if missing or unknown:
            what = "; ".join(x for x in (missing and f"missing {missing}", unknown and f"unknown {unknown}") if x)
            raise CacheError(f"{where}: cache info has {what}; rebuild it with `mimflow tokens refresh`")
        for f in fields(cls):
            if f.name not in doc:
                continue
            v = doc[f.name]
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "str": isinstance(v, str),
                "list[int]": isinstance(v, list) and all(isinstance(x, int) for x in v),
                "list[str] | None": v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
            }[str(f.type)]
            if not ok:
                raise CacheError(f"{where}: cache info field {f.name!r} should be {f.type}, got {v!r}")
        return cls(**doc)


@dataclass
class CacheSample:
    key: str
    image: bytes
    fmt: str
    tokens: np.ndarray  # uint16 [V, h, w]
    width: int
    height: int
    views: list[View]
    label: int | None


def tokens_to_npy(tokens: np.ndarray) -> bytes:
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [V, h, w], got shape {tokens.shape}")
    if tokens.size and int(tokens.max()) > np.iinfo(np.uint16).max:
        raise ValueError("token ids do not fit uint16")
    buf = io.BytesIO()
    np.save(buf, tokens.astype(np.uint16), allow_pickle=False)
    return buf.getvalue()


def tokens_from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(
    key: str, image: bytes, fmt: str, tokens: np.ndarray, width: int, height: int, views: list[View], label: int | None
) -> dict[str, bytes]:
    """A cache sample as WebDataset members: ``{extension: bytes}`` plus ``__key__``."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot")
    if tokens.shape[0] != len(views):
        raise ValueError(f"{len(views)} views but tokens for {tokens.shape[0]}")
    members = {
        "__key__": key.encode(),
        fmt: image,
        "tokens.npy": tokens_to_npy(tokens),
        "views.json": views_to_json(width, height, views),
    }
    if label is not None:
        members["cls"] = str(int(label)).encode()
    return members


def decode_sample(sample: dict[str, Any]) -> CacheSample:
    """The inverse of ``encode_sample`` on what ``webdataset`` (or ``read_shard``) yields."""
    key = sample["__key__"]
    key = key.decode() if isinstance(key, bytes) else key
    fmt = next((k for k in sample if k not in ("__key__", "__url__", "__local_path__", "tokens.npy", "views.json", "cls")), None)
    if fmt is None:
        raise CacheError(f"sample {key!r} has no image member")
    width, height, views = views_from_json(sample["views.json"])
    label = int(sample["cls"]) if "cls" in sample else None
    return CacheSample(key, sample[fmt], fmt, tokens_from_npy(sample["tokens.npy"]), width, height, views, label)


def shard_bytes(samples: Iterable[dict[str, bytes]]) -> bytes:
    """A deterministic tar: members in sample order, then extension order; no times, no owners."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for sample in samples:
            key = sample["__key__"].decode() if isinstance(sample["__key__"], bytes) else sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                data = sample[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(location: str, samples: Iterable[dict[str, bytes]]) -> tuple[int, int, str]:
    """Write a shard atomically; returns (samples, bytes, sha256)."""
    samples = list(samples)
    data = shard_bytes(samples)
    storage.write_bytes_atomic(location, data)
    return len(samples), len(data), hashlib.sha256(data).hexdigest()


def read_shard(location: str) -> list[dict[str, bytes]]:
    """All samples of one shard as ``{ext: bytes, "__key__": str}`` (tests, verify, reports)."""
    return parse_shard(storage.read_bytes(location))


def parse_shard(data: bytes) -> list[dict[str, Any]]:
    """``read_shard`` on bytes already in memory; a damaged tar raises ``tarfile.TarError``."""
    samples: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is None or current["__key__"] != key:
                current = {"__key__": key}
                samples.append(current)
            current[ext] = tf.extractfile(member).read()
    return samples


def file_sha256(location: str) -> str:
    """sha256 of a file, streamed (shards can be large)."""
    fs, path = storage.resolve(location)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_parquet_atomic(location: str, table: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(location, buf.getvalue().to_pybytes())


def read_parquet(location: str) -> pa.Table:
    # Without Arrow's thread pool: a short command that used it aborts at exit now and then
    # ("terminate called without an active exception", pyarrow 26), and these tables are small.
    return pq.read_table(pa.BufferReader(storage.read_bytes(location)), use_threads=False)


def commit_cache(cache_dir: str, info: CacheInfo, rows: list[dict[str, Any]], errors: list[dict[str, str]]) -> None:
    """The one writer of a cache's metadata: the errors file (content-named), then the manifest with
    ``info`` in its metadata, atomically, last: the commit point."""
    info.errors_file = errors_name(errors)
    info.errors = len(errors)
    table = pa.Table.from_pylist(sorted(errors, key=lambda e: e["key"]), schema=ERRORS_SCHEMA)
    write_parquet_atomic(storage.join(cache_dir, info.errors_file), table)
    rows = sorted(rows, key=lambda r: r["shard"])
    schema = MANIFEST_SCHEMA.with_metadata({INFO_KEY: info.to_json().encode()})
    write_parquet_atomic(storage.join(cache_dir, MANIFEST), pa.Table.from_pylist(rows, schema=schema))


def _manifest_table(cache_dir: str) -> pa.Table:
    path = storage.join(cache_dir, MANIFEST)
    if not storage.exists(path):
        raise CacheError(
            f"{cache_dir} has no {MANIFEST}: the cache is incomplete (a build was interrupted or is running); "
            f"rerun `mimflow tokens build` (it resumes) or `mimflow tokens refresh`"
        )
    try:
        return read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise CacheError(f"{path}: unreadable manifest ({e}); rebuild it with `mimflow tokens refresh`") from None


def read_manifest(cache_dir: str) -> list[dict[str, Any]]:
    return _manifest_table(cache_dir).to_pylist()


def read_cache_info(cache_dir: str) -> CacheInfo:
    """The one reader: the ``CacheInfo`` the committed manifest carries."""
    table = _manifest_table(cache_dir)
    where = storage.join(cache_dir, MANIFEST)
    text = (table.schema.metadata or {}).get(INFO_KEY)
    if text is None:
        raise CacheError(f"{where} carries no cache info (made by an older mimflow); rebuild it with `mimflow tokens refresh`")
    return CacheInfo.from_json(text, where)


def read_errors(cache_dir: str, info: CacheInfo) -> list[dict[str, str]]:
    path = storage.join(cache_dir, info.errors_file)
    if not storage.exists(path):
        raise CacheError(f"{cache_dir}: the manifest names {info.errors_file}, which is missing")
    return read_parquet(path).to_pylist()


def check_cache(cache_dir: str, expected_tokenizer_id: str | None = None) -> tuple[CacheInfo, list[dict[str, Any]]]:
    """(cache info, manifest rows) of a complete cache made by the expected tokenizer, else CacheError."""
    info = read_cache_info(cache_dir)
    rows = read_manifest(cache_dir)
    if expected_tokenizer_id is not None:
        found = {r["tokenizer_id"] for r in rows} | {info.tokenizer_id}
        if found != {expected_tokenizer_id}:
            raise CacheError(
                f"token cache {cache_dir} was made by tokenizer {', '.join(sorted(map(str, found)))} "
                f"but the configured tokenizer is {expected_tokenizer_id}; regenerate it with "
                f"`mimflow tokens refresh --tokenizer <tokenizer dir> --source <source> --out {Path(str(cache_dir)).parent}`"
            )
    if not rows:
        raise CacheError(f"token cache {cache_dir} is empty (its manifest lists no shards)")
    if not storage.exists(storage.join(cache_dir, info.errors_file)):
        raise CacheError(f"token cache {cache_dir}: its manifest names {info.errors_file}, which is missing; "
                         f"run `mimflow tokens refresh`")
    return info, rows


def shard_urls(cache_dir: str, rows: list[dict[str, Any]]) -> list[str]:
    return [storage.join(cache_dir, r["shard"]) for r in rows]
