"""Image folders as a source: flat (unlabelled), or class subfolders (labelled)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources import BadInput, Item, Sample, Source, SourceError, safe_key


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

    def _key(self, ref) -> str:
        return ref[0]

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
