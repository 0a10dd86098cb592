"""Data sources: image folders, WebDataset tars, IDX (MNIST) files and the built-in ``shapes``.

A source is named by a spec string, ``[kind:]location[?key=value&...]``::

    /data/images                 a folder (class subfolders give labels; ``?split=train`` picks train/)
    /data/shards/train-{000..009}.tar   WebDataset tars (jpg/png/webp, optional cls)
    idx:/data/mnist?split=test   IDX files as MNIST/Fashion-MNIST ship them (gzip or not)
    shapes?n=2000&size=64        the built-in synthetic dataset

Every source lists its items in a fixed order, splits the list into fixed-size partitions (the unit
of parallel work and of resume), yields ``Sample``s with stable keys, and reports unreadable items as
``BadInput`` rather than raising. The spec string is all a Ray worker needs to reopen the source.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union
from urllib.parse import parse_qsl

import numpy as np

from pipeline.images import IMAGE_EXTENSIONS, encode_png

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


class FolderSource(Source):
    """Flat folder: unlabelled. Class subfolders: label = index of the sorted subfolder name."""

    kind = "folder"

    def __init__(self, spec: str, location: str, params: dict[str, str], partition_size: int | None):
        super().__init__(spec, params, partition_size)
        root = Path(location).expanduser()
        split = self.params.pop("split", None)
        if split:
            root = root / split
        if not root.is_dir():
            raise SourceError(f"image folder not found: {root}")
        self.root = root.resolve()
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs:
            self.classes = subdirs
            files = [p for p in files if p.parent != self.root]  # loose files beside class dirs are ignored
        if not files:
            raise SourceError(f"no files found in {self.root}")
        keys = [safe_key(str(p.relative_to(self.root).with_suffix(""))) for p in files]
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        self._listing = [
            (k if counts[k] == 1 else f"{k}-{p.suffix.lstrip('.').lower()}", p) for k, p in zip(keys, files)
        ]

    def _fingerprint_lines(self) -> Iterator[str]:
        for key, path in self._listing:
            st = path.stat()
            yield f"{path.relative_to(self.root)}\t{st.st_size}\t{st.st_mtime_ns}"

    def _load(self, ref) -> Item:
        key, path = ref
        fmt = path.suffix.lstrip(".").lower()
        if fmt not in IMAGE_EXTENSIONS:
            return BadInput(key, str(path), f"not an image file (extension {path.suffix or 'none'!r})")
        label = self.classes.index(path.relative_to(self.root).parts[0]) if self.classes else None
        try:
            data = path.read_bytes()
        except OSError as e:
            return BadInput(key, str(path), f"cannot read file: {e}")
        return Sample(key, data, "jpg" if fmt == "jpeg" else fmt, label, str(path))


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..003}.tar`` -> 4 names; ``{a,b}`` alternatives; nested groups expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo)
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for opt in options for name in expand_braces(head + opt + tail)]


class TarSource(Source):
    """Existing WebDataset tars: samples are members grouped by key; ``cls`` gives the label."""

    kind = "webdataset"

    def __init__(self, spec: str, location: str, params: dict[str, str], partition_size: int | None):
        super().__init__(spec, params, partition_size)
        paths: list[Path] = []
        for part in location.split("::"):
            expanded = expand_braces(part)
            if len(expanded) == 1 and any(c in part for c in "*?["):
                expanded = sorted(str(p) for p in Path().glob(part)) if not Path(part).is_absolute() else sorted(
                    str(p) for p in Path("/").glob(part.lstrip("/"))
                )
            paths.extend(Path(p) for p in expanded)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"tar file(s) not found: {', '.join(missing[:5])}")
        if not paths:
            raise SourceError(f"no tar files match {location!r}")
        self.paths = paths
        listing: list = []
        labelled = False
        for tar_index, path in enumerate(paths):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(path) as tf:
                    for member in tf.getmembers():
                        if not member.isfile():
                            continue
                        base = member.name
                        stem, _, ext = base.partition(".")
                        groups.setdefault(stem, {})[ext.lower()] = member
            except (tarfile.TarError, OSError) as e:
                raise SourceError(f"cannot read tar {path}: {e}") from None
            for stem, members in groups.items():
                listing.append((tar_index, stem, members))
                labelled = labelled or "cls" in members
        self._listing = listing
        if labelled:
            self.classes = self._scan_classes()

    def _scan_classes(self) -> list[str]:
        """Class ids seen in the ``cls`` members (reads those small members only, not the images)."""
        seen: set[int] = set()
        for tar_index, path in enumerate(self.paths):
            with tarfile.open(path) as tf:
                for _, stem, members in (r for r in self._listing if r[0] == tar_index):
                    if "cls" in members:
                        try:
                            seen.add(int(tf.extractfile(members["cls"]).read().decode().strip()))
                        except (ValueError, OSError, tarfile.TarError):
                            pass  # reported as BadInput when the sample is read
        return [str(i) for i in range(max(seen) + 1)] if seen else []

    def _fingerprint_lines(self) -> Iterator[str]:
        for path in self.paths:
            st = path.stat()
            yield f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}"

    def iter_partition(self, part: Partition) -> Iterator[Item]:
        refs = self._listing[part.start : part.stop]
        open_tars: dict[int, tarfile.TarFile] = {}
        try:
            for tar_index, stem, members in refs:
                if tar_index not in open_tars:
                    open_tars[tar_index] = tarfile.open(self.paths[tar_index])
                yield self._read(open_tars[tar_index], self.paths[tar_index], stem, members)
        finally:
            for tf in open_tars.values():
                tf.close()

    def _load(self, ref) -> Item:
        tar_index, stem, members = ref
        with tarfile.open(self.paths[tar_index]) as tf:
            return self._read(tf, self.paths[tar_index], stem, members)

    def _read(self, tf: tarfile.TarFile, path: Path, stem: str, members: dict) -> Item:
        key = safe_key(stem)
        origin = f"{path}#{stem}"
        image_exts = [e for e in members if e in IMAGE_EXTENSIONS]
        if not image_exts:
            return BadInput(key, origin, f"no image member (found: {', '.join(sorted(members))})")
        ext = image_exts[0]
        try:
            data = tf.extractfile(members[ext]).read()
            label = None
            if "cls" in members:
                label = int(tf.extractfile(members["cls"]).read().decode().strip())
        except (tarfile.TarError, OSError, ValueError) as e:
            return BadInput(key, origin, f"cannot read member: {e}")
        return Sample(key, data, "jpg" if ext == "jpeg" else ext, label, origin)


class IdxSource(Source):
    """IDX files (MNIST, Fashion-MNIST). ``split`` = train | test picks train-* or t10k-* files."""

    kind = "idx"

    def __init__(self, spec: str, location: str, params: dict[str, str], partition_size: int | None):
        super().__init__(spec, params, partition_size)
        split = self.params.pop("split", "train")
        root = Path(location).expanduser()
        if root.is_file():
            images_path = root
        else:
            if not root.is_dir():
                raise SourceError(f"IDX folder not found: {root}")
            prefix = {"train": "train", "test": "t10k"}.get(split)
            if prefix is None:
                raise SourceError(f"IDX split must be train or test, got {split!r}")
            found = sorted(root.glob(f"{prefix}-images*idx3-ubyte*"))
            if not found:
                raise SourceError(f"no {prefix}-images-idx3-ubyte[.gz] in {root}")
            images_path = found[0]
        labels_path = images_path.with_name(images_path.name.replace("images", "labels").replace("idx3", "idx1"))
        self.split = split
        self.images_path = images_path
        self.labels_path = labels_path if labels_path.is_file() else None
        self._images = _read_idx(images_path, expect_dims=3)
        self._labels = _read_idx(self.labels_path, expect_dims=1) if self.labels_path else None
        if self._labels is not None:
            if len(self._labels) != len(self._images):
                raise SourceError(
                    f"{self.labels_path} has {len(self._labels)} labels for {len(self._images)} images"
                )
            self.classes = [str(i) for i in range(int(self._labels.max()) + 1)]
        self._listing = list(range(len(self._images)))

    def _fingerprint_lines(self) -> Iterator[str]:
        for path in (self.images_path, self.labels_path):
            if path is not None:
                st = path.stat()
                yield f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}"

    def _load(self, ref) -> Item:
        label = int(self._labels[ref]) if self._labels is not None else None
        data = encode_png(self._images[ref])  # IDX has no image encoding: lossless PNG
        return Sample(f"{self.split}-{ref:06d}", data, "png", label, f"{self.images_path}[{ref}]")


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte IDX file (bad magic)")
    ndim = raw[3]
    if ndim != expect_dims:
        raise SourceError(f"{path}: expected {expect_dims} dimensions, header says {ndim}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise SourceError(f"{path}: header promises {expected} bytes of data, file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


class ShapesSource(Source):
    """The built-in synthetic dataset; see ``pipeline.shapes``."""

    kind = "shapes"

    def __init__(self, spec: str, params: dict[str, str], partition_size: int | None):
        from pipeline.shapes import CLASSES

        super().__init__(spec, params, partition_size)
        self.n = int(self.params.pop("n", 2000))
        self.size = int(self.params.pop("size", 64))
        self.seed = int(self.params.pop("seed", 0))
        self.split = self.params.pop("split", "train")
        self.classes = list(CLASSES)
        self._listing = list(range(self.n))

    def _fingerprint_lines(self) -> Iterator[str]:
        from pipeline.shapes import GENERATOR_VERSION

        yield f"shapes\tv{GENERATOR_VERSION}\t{self.n}\t{self.size}\t{self.seed}\t{self.split}"

    def _load(self, ref) -> Item:
        from pipeline.shapes import render_shape

        pixels, label = render_shape(ref, size=self.size, seed=self.seed, split=self.split)
        key = f"{self.split}-{ref:06d}"
        return Sample(key, encode_png(pixels), "png", label, f"shapes[{self.split}:{ref}]")


def open_source(spec: str, partition_size: int | None = None) -> Source:
    """Open a source from its spec string (see the module docstring)."""
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
    "FolderSource",
    "IdxSource",
    "Item",
    "Partition",
    "Sample",
    "ShapesSource",
    "Source",
    "SourceError",
    "TarSource",
    "open_source",
    "read_all",
    "safe_key",
]
