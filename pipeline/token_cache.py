"""The token cache's on-disk format: WebDataset tar shards plus a Parquet manifest (the contract).

``tokens/<tokenizer_id>/``
    ``shard-000000.tar`` …  one sample = two members: ``<key>.<fmt>`` (source bytes, unchanged) and
                           ``<key>.mim`` (tokens, views and label in one small binary record, below)
    ``errors-<digest>.parquet``  inputs that could not be used: key, source, reason (named by content)
    ``manifest.parquet``   one row per shard, and in its metadata the ``CacheInfo`` (what made the cache,
                           which errors file belongs to it); written last and atomically: it is the one
                           commit point, so a reader sees the old cache or the new one, never a mix

A ``.mim`` member (``pack_meta``/``unpack_meta``, format 3) is, little-endian::

    magic  b"MIM1"         4 bytes
    V, h, w                3 x uint16   the token array's shape
    n                      uint32       length of the views JSON
    label                  int64        the class index; -1 when unlabelled
    views                  n bytes      ``pipeline.views.views_to_json`` (opaque here)
    tokens                 V*h*w uint16 row-major ``[V, h, w]``

One member instead of three (format 2 had ``tokens.npy``, ``views.json``, ``cls``) saves two 512-byte tar
headers and their padding per sample: most of a small image's cache. A format-2 cache is refused with
the command that rebuilds it (``mimflow tokens refresh``).

Tars are written deterministically (sorted members, zero mtimes and owners), so the same input gives
byte-identical shards and the same sha256 on any machine. Nothing in a shard is pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
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
# 2: CacheInfo inside the manifest, content-named errors file, key-hashed partitions;
# 3: one ``.mim`` member per sample beside the image, bytes per sample in the CacheInfo
CACHE_FORMAT = 3
SAMPLE_MEMBER = "mim"  # the extension of a sample's tokens + views + label member
_MIM_MAGIC = b"MIM1"
_MIM_HEADER = struct.Struct("<4sHHHIq")  # magic, V, h, w, views JSON length, label (-1: none)
# what format 2 (four members per sample) added to a CacheInfo: filled in when reading one to refresh it
_ADDED_IN_3 = {"shard_bytes": 0, "image_bytes": 0, "bytes_per_sample": 0.0}

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
    shard_bytes: int  # all listed shards together
    image_bytes: int  # the source image members among them (the rest is tokens, views, labels, tar)
    bytes_per_sample: float  # shard_bytes / samples
    view_style: str = ""  # ViewStyle.key(); "" = the default (and what caches made before it had)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str, any_format: bool = False) -> "CacheInfo":
        """Parse and type-check; a missing, unknown or mistyped key is a CacheError naming ``where``.

        A cache of another format is refused, naming the command that rebuilds it; ``any_format``
        reads a format-2 one anyway (what ``tokens refresh`` needs to rebuild it in place)."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise CacheError(f"{where}: cache info is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise CacheError(f"{where}: cache info is not a JSON object")
        if doc.get("format") != CACHE_FORMAT:
            if not any_format:
                old = " (four tar members per sample: image, tokens.npy, views.json, cls)" if doc.get("format") == 2 else ""
                raise CacheError(
                    f"{where}: token cache of format {doc.get('format')!r}{old}; this mimflow reads format "
                    f"{CACHE_FORMAT} (image + one .mim member per sample): rebuild it in place with "
                    f"`mimflow tokens refresh --tokenizer <tokenizer dir> --out {str(where).rsplit('/', 2)[0]}`"
                )
            if doc.get("format") == 2:
                doc = {**_ADDED_IN_3, **doc}
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
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
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


def pack_meta(tokens: np.ndarray, views_json: bytes, label: int | None) -> bytes:
    """The ``.mim`` member (layout in the module docstring): the one writer."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [V, h, w], got shape {tokens.shape}")
    if max(tokens.shape) > 0xFFFF:
        raise ValueError(f"tokens of shape {tokens.shape} do not fit the .mim header")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(np.uint16).max):
        raise ValueError("token ids do not fit uint16")
    if label is not None and int(label) < 0:
        raise ValueError(f"label {label} is negative")
    head = _MIM_HEADER.pack(_MIM_MAGIC, *tokens.shape, len(views_json), -1 if label is None else int(label))
    return head + views_json + np.ascontiguousarray(tokens, dtype="<u2").tobytes()


def unpack_meta(data: bytes) -> tuple[np.ndarray, bytes, int | None]:
    """(tokens uint16 [V, h, w], views JSON, label or None) of a ``.mim`` member; ValueError if damaged."""
    if len(data) < _MIM_HEADER.size:
        raise ValueError(f"{len(data)} bytes, shorter than the {_MIM_HEADER.size}-byte header")
    magic, v, h, w, n, label = _MIM_HEADER.unpack_from(data)
    if magic != _MIM_MAGIC:
        raise ValueError(f"starts with {magic!r}, not {_MIM_MAGIC!r}")
    want = _MIM_HEADER.size + n + 2 * v * h * w
    if len(data) != want:
        raise ValueError(f"{len(data)} bytes, its header says {want} (V={v}, h={h}, w={w}, views JSON {n} bytes)")
    if label < -1:
        raise ValueError(f"label {label}")
    start = _MIM_HEADER.size + n
    tokens = np.frombuffer(data, dtype="<u2", offset=start).reshape(v, h, w).astype(np.uint16)  # a writable copy
    return tokens, bytes(data[_MIM_HEADER.size : start]), None if label == -1 else int(label)


def sample_error(url: Any, key: Any, why: object) -> CacheError:
    """A damaged sample (or shard, ``key`` None) as one line naming the shard, the key and the command."""
    shard = str(url).rsplit("/", 1)[-1] if url else "a shard"
    cache = str(url).rsplit("/", 1)[0] if url else "the cache"
    why = " ".join(str(why).split())  # one line, whatever the underlying message
    return CacheError(f"token cache: {shard}, sample {key!r}: {why}; run `mimflow tokens verify {cache}`")


def encode_sample(
    key: str, image: bytes, fmt: str, tokens: np.ndarray, width: int, height: int, views: list[View], label: int | None
) -> dict[str, bytes]:
    """A cache sample as WebDataset members: ``{fmt: image, "mim": tokens+views+label}`` plus ``__key__``."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot")
    if fmt == SAMPLE_MEMBER or fmt.startswith("__"):
        raise ValueError(f"image format {fmt!r} is not an image extension")
    if tokens.shape[0] != len(views):
        raise ValueError(f"{len(views)} views but tokens for {tokens.shape[0]}")
    return {"__key__": key.encode(), fmt: image, SAMPLE_MEMBER: pack_meta(tokens, views_to_json(width, height, views), label)}


def decode_sample(sample: dict[str, Any]) -> CacheSample:
    """The inverse of ``encode_sample`` on what ``webdataset`` (or ``read_shard``) yields: the one reader.
    A missing or damaged member is a CacheError naming the shard (``__url__``) and the key."""
    key = sample["__key__"]
    key = key.decode() if isinstance(key, bytes) else key
    url = sample.get("__url__")
    if SAMPLE_MEMBER not in sample:
        if "tokens.npy" in sample:
            raise sample_error(url, key, "written in cache format 2 (tokens.npy, views.json, cls members); "
                                         "rebuild the cache with `mimflow tokens refresh`")
        raise sample_error(url, key, f"no .{SAMPLE_MEMBER} member")
    fmts = [k for k in sample if not k.startswith("__") and k != SAMPLE_MEMBER]
    if len(fmts) != 1:
        raise sample_error(url, key, f"expected one image member beside .{SAMPLE_MEMBER}, found {fmts or 'none'}")
    try:
        tokens, views_json, label = unpack_meta(sample[SAMPLE_MEMBER])
        width, height, views = views_from_json(views_json)
    except (ValueError, KeyError, TypeError) as e:
        raise sample_error(url, key, f"damaged .{SAMPLE_MEMBER} member ({e})") from None
    if len(views) != tokens.shape[0]:
        raise sample_error(url, key, f"damaged .{SAMPLE_MEMBER} member ({len(views)} views, tokens for {tokens.shape[0]})")
    return CacheSample(key, sample[fmts[0]], fmts[0], tokens, width, height, views, label)


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


def read_shard(location: str) -> list[dict[str, Any]]:
    """All samples of one shard as ``{ext: bytes, "__key__": str, "__url__": location}`` (tests, reports)."""
    samples = parse_shard(storage.read_bytes(location))
    for s in samples:
        s["__url__"] = location  # as webdataset does: decode_sample's errors name the shard
    return samples


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


def read_cache_info(cache_dir: str, any_format: bool = False) -> CacheInfo:
    """The one reader: the ``CacheInfo`` the committed manifest carries (of this format unless ``any_format``)."""
    table = _manifest_table(cache_dir)
    where = storage.join(cache_dir, MANIFEST)
    text = (table.schema.metadata or {}).get(INFO_KEY)
    if text is None:
        raise CacheError(f"{where} carries no cache info (made by an older mimflow); rebuild it with `mimflow tokens refresh`")
    return CacheInfo.from_json(text, where, any_format)


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
