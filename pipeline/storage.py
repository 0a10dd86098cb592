"""One filesystem layer for local paths and URIs (``s3://``, ``gs://``, ``file://``), via pyarrow.fs.

Every stage reads and writes through it, so every input and output may be a URI. Object stores are
configured from the standard environment, never from our configs (and never logged): S3 from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_REGION`` and ``AWS_ENDPOINT_URL(_S3)`` for an
S3-compatible server; GCS from application default credentials. Requests time out and are retried.

Stages write outputs through ``atomic_output``: on a local disk the bytes go to a temporary name in
the same directory and are renamed into place when complete, so a reader never sees a partial file;
object stores make an object visible only when its upload completes, which gives the same guarantee.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "file")
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 120.0
MAX_ATTEMPTS = 5
SPOOL_IN_MEMORY = 64 << 20  # bytes of an object-store write kept in memory before spilling to disk
COPY_CHUNK = 8 << 20


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def scheme(location: str | os.PathLike) -> str:
    """``s3``, ``gs``, ``file``, or ``""`` for a local path."""
    return urlsplit(str(location)).scheme if is_uri(location) else ""


@functools.lru_cache(maxsize=None)
def _s3(endpoint: str | None, region: str | None, access_key: str | None) -> pafs.S3FileSystem:
    # access_key only keys the cache: the SDK reads the credentials from the environment itself
    options = dict(connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                   retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS))
    if endpoint:  # an S3-compatible server (MinIO, moto, ...): path-style URLs, the scheme it names
        parts = urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc or parts.path, scheme=parts.scheme or "https",
                       force_virtual_addressing=False)
    return pafs.S3FileSystem(region=region or "us-east-1", **options)


@functools.lru_cache(maxsize=None)
def _gcs() -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem(retry_time_limit=REQUEST_TIMEOUT_S)


@functools.lru_cache(maxsize=256)
def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:  # no permission to ask: fall back to the default region
        return "us-east-1"


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it). Local paths and ``file://`` URIs are made absolute."""
    location = str(location)
    kind = scheme(location)
    if not kind:
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    parts = urlsplit(location)
    path = (parts.netloc + parts.path).rstrip("/") if kind != "file" else parts.path
    if kind == "file":
        return pafs.LocalFileSystem(), str(Path(path).resolve())
    if kind == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not endpoint and not region:
            region = _bucket_region(parts.netloc)
        return _s3(endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID")), path
    if kind == "gs":
        return _gcs(), path
    raise ValueError(f"{location}: unsupported scheme {kind!r} (use a local path, {', '.join(s + '://' for s in SCHEMES)})")


def absolute(location: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def exists(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(location: str | os.PathLike) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def list_names(location: str | os.PathLike) -> list[str]:
    """Names (not paths) directly inside a directory, sorted; [] if it does not exist."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(info.base_name for info in infos)


def size(location: str | os.PathLike) -> int:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(str(location))
    return int(info.size)


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {location}") from None


def open_input(location: str | os.PathLike) -> IO[bytes]:
    """A sequential reader (streamed from object stores, not downloaded first)."""
    fs, path = resolve(location)
    try:
        return fs.open_input_stream(path, compression=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {location}") from None


def open_random_access(location: str | os.PathLike) -> IO[bytes]:
    """A seekable reader: on object stores each read is a ranged request (tar members, headers)."""
    fs, path = resolve(location)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {location}") from None


def stat(location: str | os.PathLike) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file; what a source fingerprint is made of."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"file not found: {location}")
    return int(info.size), int(info.mtime_ns or 0)


def glob(pattern: str) -> list[str]:
    """Files matching a ``*``/``?``/``[...]`` pattern in its last path component, sorted."""
    if not is_uri(pattern):
        path = Path(pattern).expanduser()
        return sorted(str(p) for p in path.parent.glob(path.name) if p.is_file())
    parent, _, name = pattern.rpartition("/")
    return [join(parent, n) for n in list_names(parent) if fnmatch.fnmatchcase(n, name) and not is_dir(join(parent, n))]


def list_files(location: str | os.PathLike) -> list[str]:
    """Every file below a directory or prefix, recursively, as locations of the same kind, sorted.

    Hidden entries (a path component starting with ``.``) are left out, as everywhere else.
    """
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    base = str(location).rstrip("/")
    found = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        found.append(join(base, rel))
    return sorted(found)


def remove(location: str | os.PathLike) -> None:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextmanager
def atomic_output(location: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write a file so it appears complete or not at all; on error nothing is left behind.

    Locally: a temporary name in the same directory, renamed into place. Object stores: the bytes are
    spooled (memory, then a local temporary file) and uploaded only once the writer finished, because
    closing an object-store stream always completes the upload, a failed write's partial bytes too.
    """
    fs, path = resolve(location)
    local = isinstance(fs, pafs.LocalFileSystem)
    if not local:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            yield spool
            spool.seek(0)
            with fs.open_output_stream(path, compression=None) as out:
                shutil.copyfileobj(spool, out, COPY_CHUNK)
        return
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    stream = fs.open_output_stream(target, compression=None)
    try:
        yield stream
        stream.close()
        os.replace(target, path)  # atomic on POSIX within one directory
    except BaseException as e:
        try:
            with suppress(OSError):  # closing a stream on a full disk fails again: keep the first error
                stream.close()
        finally:
            if os.path.exists(target):
                os.remove(target)
        if isinstance(e, OSError) and e.errno is not None and str(location) not in str(e):
            # pyarrow's write errors do not say which file (e.g. ENOSPC mid-shard): name it
            try:
                named = type(e)(e.errno, f"cannot write {location}: {e.strerror or e}")
            except Exception:  # an OSError subclass with another constructor: keep it as it is
                raise e from None
            raise named from None  # (a remote traceback would carry the chain into the message)
        raise


def write_bytes_atomic(location: str | os.PathLike, data: bytes) -> None:
    with atomic_output(location) as f:
        f.write(data)
