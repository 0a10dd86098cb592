"""Image folders as a source: flat (unlabelled), or class subfolders (labelled).

Every file under the root is one item, a sample or an error row, except hidden ones (``is_hidden``).
Symlinks are followed, to files or folders, inside or outside the root; a link that loops back to a
folder above it, or points nowhere, is an error row, as is anything that is not a regular file and a
file lying beside the class folders (it has no class).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from pipeline import storage
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.source_base import BadInput, Item, Sample, Source, SourceError, is_hidden, make_key


@dataclass(frozen=True)
class _File:
    key: str
    rel: str  # path relative to the root, '/'-separated: the item's identity
    path: str  # as listed (through any symlinks, not resolved), or a URI
    label: int | None
    error: str | None = None  # set for items that are error rows already when listed

    @property
    def origin(self) -> str:
        return self.path


def _walk_prefix(root: str) -> Iterator[tuple]:
    """The same as ``_walk`` for an object-store prefix: no links there, hidden keys already left out."""
    for location in storage.list_files(root):
        yield tuple(location[len(root):].strip("/").split("/")), location, None


def _walk(folder: Path, rel: tuple[str, ...], ancestors: tuple[tuple[int, int], ...]) -> Iterator[tuple]:
    """(rel parts, path, error or None) for every non-hidden entry below ``folder``, sorted, links followed."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        yield rel, folder, f"cannot list folder: {e.strerror or e}"
        return
    for entry in entries:
        parts = (*rel, entry.name)
        if is_hidden(parts[-1:]):
            continue
        path = Path(entry.path)
        try:
            st = os.stat(path)  # follows links
        except OSError as e:
            if e.errno == errno.ELOOP:
                yield parts, path, "symlink loop (the link resolves to itself)"
            elif entry.is_symlink():
                yield parts, path, f"dangling symlink (points to {os.readlink(path)!r}, which does not exist)"
            else:
                yield parts, path, f"cannot read file: {e.strerror or e}"
            continue
        if stat.S_ISDIR(st.st_mode):
            ident = (st.st_dev, st.st_ino)
            if ident in ancestors:
                yield parts, path, "symlink loop (links to a folder that contains it)"
                continue
            yield from _walk(path, parts, (*ancestors, ident))
        elif stat.S_ISREG(st.st_mode):
            yield parts, path, None
        else:
            yield parts, path, "not a regular file (device, socket or pipe)"


class FolderSource(Source):
    """Flat folder: unlabelled. Class subfolders: label = index of the sorted subfolder name."""

    kind = "folder"

    def __init__(self, spec: str, location: str, params: dict[str, str], partition_size: int | None):
        super().__init__(spec, params, partition_size)
        split = self.params.pop("split", None)
        if storage.is_uri(location):
            root = storage.join(location, split) if split else location.rstrip("/")
            entries = list(_walk_prefix(root))
            subdirs = sorted({parts[0] for parts, _, _ in entries if len(parts) > 1})
            if not entries:
                raise SourceError(f"no files found under {root}")
        else:
            path = Path(location).expanduser() / (split or "")
            if not path.is_dir():
                raise SourceError(f"image folder not found: {path}")
            path = path.resolve()
            st = os.stat(path)
            root_id = (st.st_dev, st.st_ino)
            entries = [(parts, str(p), error) for parts, p, error in _walk(path, (), (root_id,))]
            subdirs = sorted(  # a link back to the root is a loop (an error row), not a class
                p.name for p in path.iterdir()
                if not is_hidden((p.name,)) and p.is_dir() and (p.stat().st_dev, p.stat().st_ino) != root_id
            )
            root = str(path)
        self.root = root
        self.classes = subdirs or None
        index = {name: i for i, name in enumerate(subdirs)}
        listing = []
        for parts, path, error in entries:
            rel = "/".join(parts)
            label = index.get(parts[0]) if self.classes and len(parts) > 1 else None
            if self.classes and label is None and error is None:
                error = "file beside the class folders has no class (move it into one)"
            readable = "/".join((*parts[:-1], parts[-1].rsplit(".", 1)[0]))  # the extension is in the hash
            listing.append(_File(make_key(rel, readable), rel, path, label, error))
        if not listing:
            raise SourceError(f"no files found in {self.root}")
        self._listing = listing

    def _fingerprint_lines(self) -> Iterator[str]:
        for f in self._listing:
            if f.error is not None:
                yield f"{f.rel}\terror\t{f.error}"
                continue
            try:
                size, mtime_ns = storage.stat(f.path)
                yield f"{f.rel}\t{size}\t{mtime_ns}"
            except OSError as e:  # gone since listing: the fingerprint must still change, not crash
                yield f"{f.rel}\tgone\t{e.errno}"

    def _load(self, ref: _File) -> Item:
        if ref.error is not None:
            return BadInput(ref.key, ref.origin, ref.error)
        suffix = PurePosixPath(ref.rel).suffix
        fmt = suffix.lstrip(".").lower()
        if fmt not in IMAGE_EXTENSIONS:
            return BadInput(ref.key, ref.origin, f"not an image file (extension {suffix or 'none'!r})")
        try:
            data = storage.read_bytes(ref.path)
        except OSError as e:
            return BadInput(ref.key, ref.origin, f"cannot read file: {e}")
        return Sample(ref.key, data, "jpg" if fmt == "jpeg" else fmt, ref.label, ref.origin)
