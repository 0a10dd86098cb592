"""Data sources: image folders, WebDataset tars, IDX (MNIST) files and the built-in ``shapes``.

A source is named by a spec string, ``[kind:]location[?key=value&...]``::

    /data/images                 a folder (class subfolders give labels; ``?split=train`` picks train/)
    /data/shards/train-{000..009}.tar   WebDataset tars (jpg/png/webp, optional cls)
    idx:/data/mnist?split=test   IDX files as MNIST/Fashion-MNIST ship them (gzip or not)
    shapes?n=2000&size=64        the built-in synthetic dataset
    /data/images?sample=1000&subset_seed=0   any source, a seeded random 1000 of its items

Every source lists its items in a fixed order, assigns each item to a partition (the unit of parallel
work and of resume) by a hash of its key, so that adding or removing k items changes at most k
partitions, yields ``Sample``s with stable keys, and reports unreadable items as
``BadInput`` rather than raising. The spec string is all a Ray worker needs to reopen the source.

Every kind takes the same subset options, applied here in the base class after the reader has
listed its items: ``n=N`` keeps the first N items of the stable order; ``sample=N&subset_seed=S``
keeps a seeded random N (chosen by a hash of each key, so the choice does not depend on the order or
on other items; kept in source order); both together draw the sample from the first N. A subset
changes the source's fingerprint.

Keys of folder and tar items are a readable prefix plus a short hash of the item's exact identity
(``make_key``); two items that still end up with one key make the source fail, naming both.
Names starting with ``.`` (files, folders, tar members) are hidden and skipped by every reader
(``is_hidden``).

This module is the API: ``open_source`` and the types of ``pipeline.source_base`` (where the ``Source``
base class lives); the reader for each kind is in ``pipeline.source_folder``, ``source_tar``,
``source_idx`` and ``source_shapes``.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl

from pipeline import storage
from pipeline.errors import SourceError
from pipeline.source_base import (MAX_CLASSES, BadInput, Item, Partition, Sample, Source, Subset, is_hidden, make_key,
                                  parse_label, partition_of, safe_key, split_spec, with_params)
from pipeline.source_folder import FolderSource
from pipeline.source_idx import IdxSource
from pipeline.source_shapes import ShapesSource
from pipeline.source_tar import TarSource


def parse_spec(spec: str) -> tuple[str, str, str]:
    """``[kind:]location[?query]`` -> (kind in lower case, or "" when none, location, query)."""
    body, _, query = str(spec).partition("?")
    kind, sep, location = body.partition(":")
    if not sep or len(kind) == 1 or location.startswith("//"):  # a drive letter or URI scheme is not a kind
        kind, location = "", body
    return kind.lower(), location, query


def absolute_spec(spec: str, base: str | os.PathLike) -> str:
    """The spec with its location made absolute against ``base`` (``shapes`` and URIs unchanged), so
    that a Ray worker running in another directory opens the same files."""
    kind, location, _ = parse_spec(spec)
    if kind == "shapes" or location in ("", "shapes") or "://" in location:
        return str(spec)
    body, sep, query = str(spec).partition("?")
    prefix = body[: len(body) - len(location)]  # "idx:", "wds:" or nothing
    return prefix + os.path.normpath(os.path.join(base, os.path.expanduser(location))) + sep + query


def open_source(spec: str, partition_size: int | None = None) -> Source:
    """Open a source from its spec string (see the module docstring)."""
    spec = str(spec)
    kind, location, query = parse_spec(spec)
    body = spec.partition("?")[0]
    params = dict(parse_qsl(query, keep_blank_values=True))
    if kind == "shapes" or (not kind and body == "shapes"):
        source: Source = ShapesSource(spec, params, partition_size)
    elif kind == "idx":
        source = IdxSource(spec, location, params, partition_size)
    elif kind in ("wds", "webdataset") or (not kind and ".tar" in location):
        source = TarSource(spec, location, params, partition_size)
    elif kind in ("folder", ""):
        if not kind and storage.is_dir(location) and storage.glob(storage.join(location, "*idx3-ubyte*")):
            source = IdxSource(spec, location, params, partition_size)
        else:
            source = FolderSource(spec, location, params, partition_size)
    else:
        raise SourceError(f"unknown source kind {kind!r} in {spec!r} (known: folder, wds, idx, shapes)")
    if source.params:
        raise SourceError(f"unknown source option(s) {sorted(source.params)} in {spec!r}")
    source._finish_listing()
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
    "MAX_CLASSES",
    "Partition",
    "Sample",
    "Source",
    "SourceError",
    "Subset",
    "absolute_spec",
    "is_hidden",
    "make_key",
    "open_source",
    "parse_label",
    "partition_of",
    "read_all",
    "safe_key",
    "split_spec",
    "with_params",
]
