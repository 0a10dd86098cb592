"""Data sources: image folders, WebDataset tars, IDX (MNIST) files and the built-in ``shapes``.

A source is named by a spec string, ``[kind:]location[?key=value&...]``::

    /data/images                 a folder (class subfolders give labels; ``?split=train`` picks train/)
    /data/shards/train-{000..009}.tar   WebDataset tars (jpg/png/webp, optional cls)
    idx:/data/mnist?split=test   IDX files as MNIST/Fashion-MNIST ship them (gzip or not)
    shapes?n=2000&size=64        the built-in synthetic dataset

Every source lists its items in a fixed order, splits the list into fixed-size partitions (the unit
of parallel work and of resume), yields ``Sample``s with stable keys, and reports unreadable items as
``BadInput`` rather than raising. The spec string is all a Ray worker needs to reopen the source.

This module holds those types, the ``Source`` base class and ``open_source``; the reader for each
kind is in ``pipeline.source_folder``, ``source_tar``, ``source_idx`` and ``source_shapes``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union
from urllib.parse import parse_qsl

from pipeline.errors import SourceError

DEFAULT_PARTITION_SIZE = 512


@dataclass(frozen=True)
class Sample:
    key: str  # stable, unique within the source, no dots (WebDataset splits on them)
    data: bytes  # encoded image bytes exactly as the source holds them
    fmt: str  # file extension of ``data``: jpg, png, webp, ...
    label: int | None
    origin: str  # where it came from, for reports: a path, or tar path + member


@dataclass(frozen=True)
class BadInput:
    key: str
    origin: str
    reason: str


Item = Union[Sample, BadInput]


@dataclass(frozen=True)
class Partition:
    index: int
    start: int  # range [start, stop) of the source's ordered listing
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def safe_key(text: str) -> str:
    """A WebDataset-safe key: letters, digits, ``_`` and ``-``; anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


class Source:
    """Base class: subclasses fill ``_listing`` (ordered refs) and implement ``_load``."""

    kind = "source"

    def __init__(self, spec: str, params: dict[str, str], partition_size: int | None):
        self.spec = spec
        self.params = params
        self.partition_size = int(params.pop("partition_size", partition_size or DEFAULT_PARTITION_SIZE))
        self.classes: list[str] | None = None
        self._listing: list = []

    def __len__(self) -> int:
        return len(self._listing)

    @property
    def labelled(self) -> bool:
        return self.classes is not None

    def partitions(self) -> list[Partition]:
        n, size = len(self._listing), self.partition_size
        return [Partition(i, s, min(s + size, n)) for i, s in enumerate(range(0, n, size))]

    def iter_partition(self, part: Partition) -> Iterator[Item]:
        for ref in self._listing[part.start : part.stop]:
            yield self._load(ref)

    def __iter__(self) -> Iterator[Item]:
        for part in self.partitions():
            yield from self.iter_partition(part)

    def fingerprint(self) -> str:
        """Changes when the listing changes (names, sizes, mtimes, or generator parameters)."""
        h = hashlib.sha256(self.kind.encode())
        for line in self._fingerprint_lines():
            h.update(line.encode() + b"\n")
        return h.hexdigest()[:16]

    def describe(self) -> str:
        cls = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"{self.kind} source {self.spec!r}: {len(self)} items, {cls}, {len(self.partitions())} partitions"

    def _fingerprint_lines(self) -> Iterator[str]:
        raise NotImplementedError

    def _load(self, ref) -> Item:
        raise NotImplementedError


def split_spec(spec: str) -> tuple[str, str, str]:
    """``[kind:]location[?query]`` -> (kind in lower case, or "" when none, location, query)."""
    body, _, query = str(spec).partition("?")
    kind, sep, location = body.partition(":")
    if not sep or len(kind) == 1:  # no kind prefix (a Windows drive letter is not a kind)
        kind, location = "", body
    return kind.lower(), location, query


def absolute_spec(spec: str, base: str | Path) -> str:
    """The spec with its location made absolute against ``base`` (``shapes`` and URIs unchanged), so
    that a Ray worker running in another directory opens the same files."""
    kind, location, _ = split_spec(spec)
    if kind == "shapes" or location in ("", "shapes") or "://" in location:
        return str(spec)
    body, sep, query = str(spec).partition("?")
    prefix = body[: len(body) - len(location)]  # "idx:", "wds:" or nothing
    return prefix + os.path.normpath(os.path.join(base, os.path.expanduser(location))) + sep + query


def open_source(spec: str, partition_size: int | None = None) -> Source:
    """Open a source from its spec string (see the module docstring)."""
    # The readers import this module's types, so they can only be imported once it is loaded.
    from pipeline.source_folder import FolderSource
    from pipeline.source_idx import IdxSource
    from pipeline.source_shapes import ShapesSource
    from pipeline.source_tar import TarSource

    spec = str(spec)
    kind, location, query = split_spec(spec)
    body = spec.partition("?")[0]
    params = dict(parse_qsl(query, keep_blank_values=True))
    if kind == "shapes" or (not kind and body == "shapes"):
        source: Source = ShapesSource(spec, params, partition_size)
    elif kind == "idx":
        source = IdxSource(spec, location, params, partition_size)
    elif kind in ("wds", "webdataset") or (not kind and ".tar" in location):
        source = TarSource(spec, location, params, partition_size)
    elif kind in ("folder", ""):
        path = Path(location).expanduser()
        if not kind and path.is_dir() and any(path.glob("*idx3-ubyte*")):
            source = IdxSource(spec, location, params, partition_size)
        else:
            source = FolderSource(spec, location, params, partition_size)
    else:
        raise SourceError(f"unknown source kind {kind!r} in {spec!r} (known: folder, wds, idx, shapes)")
    if source.params:
        raise SourceError(f"unknown source option(s) {sorted(source.params)} in {spec!r}")
    return source


def read_all(source: Source) -> tuple[list[Sample], list[BadInput]]:
    """Small sources only (tests, previews): every sample and every bad input, in order."""
    good, bad = [], []
    for item in source:
        (good if isinstance(item, Sample) else bad).append(item)
    return good, bad


__all__ = [
    "BadInput",
    "Item",
    "Partition",
    "Sample",
    "Source",
    "SourceError",
    "open_source",
    "read_all",
    "absolute_spec",
    "safe_key",
    "split_spec",
]
