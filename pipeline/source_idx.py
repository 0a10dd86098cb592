"""IDX files (MNIST, Fashion-MNIST, gzipped or not) as a source; images come out as lossless PNG."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline import storage
from pipeline.images import encode_png
from pipeline.source_base import Item, Sample, Source, SourceError


class IdxSource(Source):
    """IDX files (MNIST, Fashion-MNIST). ``split`` = train | test picks train-* or t10k-* files."""

    kind = "idx"

    def __init__(self, spec: str, location: str, params: dict[str, str], partition_size: int | None):
        super().__init__(spec, params, partition_size)
        split = self.params.pop("split", "train")
        root = location if storage.is_uri(location) else str(Path(location).expanduser().resolve())
        if storage.exists(root) and not storage.is_dir(root):
            images_path = root
        else:
            if not storage.is_dir(root):
                raise SourceError(f"IDX folder not found: {root}")
            prefix = {"train": "train", "test": "t10k"}.get(split)
            if prefix is None:
                raise SourceError(f"IDX split must be train or test, got {split!r}")
            found = storage.glob(storage.join(root, f"{prefix}-images*idx3-ubyte*"))
            if not found:
                raise SourceError(f"no {prefix}-images-idx3-ubyte[.gz] in {root}")
            images_path = found[0]
        folder, _, name = images_path.rpartition("/")
        labels_path = f"{folder}/{name.replace('images', 'labels').replace('idx3', 'idx1')}"
        self.split = split
        self.images_path = images_path
        self.labels_path = labels_path if storage.exists(labels_path) else None
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
                size, mtime_ns = storage.stat(path)
                yield f"{path}\t{size}\t{mtime_ns}"

    def _key(self, ref: int) -> str:
        return f"{self.split}-{ref:06d}"

    def _ref_origin(self, ref: int) -> str:
        return f"{self.images_path}[{ref}]"

    def _load(self, ref) -> Item:
        label = int(self._labels[ref]) if self._labels is not None else None
        data = encode_png(self._images[ref])  # IDX has no image encoding: lossless PNG
        return Sample(self._key(ref), data, "png", label, self._ref_origin(ref))


def _read_idx(path: str, expect_dims: int) -> np.ndarray:
    try:
        raw = storage.read_bytes(path)
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
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
