"""One filesystem layer for local paths and object-store URIs (``s3://``, ``gs://``), via pyarrow.fs.

Stages write outputs through ``atomic_output``: on a local disk the bytes go to a temporary name in
the same directory and are renamed into place when complete, so a reader never sees a partial file;
object stores make an object visible only when its upload completes, which gives the same guarantee.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it). Local paths are made absolute."""
    location = str(location)
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


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
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {location}") from None


def remove(location: str | os.PathLike) -> None:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextmanager
def atomic_output(location: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write a file so it appears complete or not at all; on error nothing is left behind."""
    fs, path = resolve(location)
    local = isinstance(fs, pafs.LocalFileSystem)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    stream = fs.open_output_stream(target)
    try:
        yield stream
        stream.close()
        if local:
            os.replace(target, path)  # atomic on POSIX within one directory
    except BaseException as e:
        try:
            with suppress(OSError):  # closing a stream on a full disk fails again: keep the first error
                stream.close()
        finally:
            if local and os.path.exists(target):
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
