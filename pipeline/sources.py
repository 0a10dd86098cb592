"""Data sources: image folders, WebDataset tars, IDX (MNIST) files and the built-in ``shapes``.

A source is named by a spec string, ``[kind:]location[?key=value&...]``::

    /data/images                 a folder (class subfolders give labels; ``?split=train`` picks train/)
    /data/shards/train-{000..009}.tar   WebDataset tars (jpg/png/webp, optional cls)
    idx:/data/mnist?split=test   IDX files as MNIST/Fashion-MNIST ship them (gzip or not)
    shapes?n=2000&size=64        the built-in synthetic dataset

Every source lists its items in a fixed order, assigns each item to a partition (the unit of parallel
work and of resume) by a hash of its key, so that adding or removing k items changes at most k
partitions, yields ``Sample``s with stable keys, and reports unreadable items as
``BadInput`` rather than raising. The spec string is all a Ray worker needs to reopen the source.

This module holds those types, the ``Source`` base class and ``open_source``; the reader for each
kind is in ``pipeline.source_folder``, ``source_tar``, ``source_idx`` and ``source_shapes``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union
from urllib.parse import parse_qsl

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
    start: int  # range [start, stop) of the source's ordered listing (when ``positions`` is None)
    stop: int
    positions: tuple[int, ...] | None = None  # listing positions of its items, ordered by key

    @property
    def size(self) -> int:
        return len(self.positions) if self.positions is not None else self.stop - self.start


def partition_of(key: str, count: int) -> int:
    """The partition an item belongs to: a stable hash of its key, independent of the listing."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count


class SourceError(ValueError):
    """A source spec that cannot be opened: missing path, no images, malformed IDX header..."""


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

    def default_partitions(self) -> int:
        """The partition count a new cache of this source gets (then fixed: pass it to ``partitions``)."""
        return max(1, -(-len(self._listing) // self.partition_size))

    def partitions(self, count: int | None = None) -> list[Partition]:
        """``count`` partitions (default ``default_partitions()``); item -> ``partition_of(key, count)``.

        Assignment by key, not by position, so inserting, deleting or changing k items changes at
        most k partitions; inside a partition items are ordered by key. A partition may be empty.
        """
        count = count or self.default_partitions()
        members: list[list[tuple[str, int]]] = [[] for _ in range(count)]
        for pos, ref in enumerate(self._listing):
            key = self._key(ref)
            members[partition_of(key, count)].append((key, pos))
        return [Partition(i, 0, 0, tuple(pos for _, pos in sorted(m))) for i, m in enumerate(members)]

    def _refs(self, part: Partition) -> list:
        if part.positions is not None:
            return [self._listing[p] for p in part.positions]
        return self._listing[part.start : part.stop]

    def iter_partition(self, part: Partition) -> Iterator[Item]:
        for ref in self._refs(part):
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
        return f"{self.kind} source {self.spec!r}: {len(self)} items, {cls}, {self.default_partitions()} partitions"

    def _fingerprint_lines(self) -> Iterator[str]:
        raise NotImplementedError

    def _load(self, ref) -> Item:
        raise NotImplementedError

    def _key(self, ref) -> str:
        """The key ``_load(ref)`` gives its item, without reading it."""
        raise NotImplementedError


def open_source(spec: str, partition_size: int | None = None) -> Source:
    """Open a source from its spec string (see the module docstring)."""
    # The readers import this module's types, so they can only be imported once it is loaded.
    from pipeline.source_folder import FolderSource
    from pipeline.source_idx import IdxSource
    from pipeline.source_shapes import ShapesSource
    from pipeline.source_tar import TarSource

    spec = str(spec)
    body, _, query = spec.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    kind, sep, location = body.partition(":")
    if not sep or len(kind) == 1:  # no kind prefix (a Windows drive letter is not a kind)
        kind, location = "", body
    kind = kind.lower()
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
    "partition_of",
    "read_all",
    "safe_key",
]
