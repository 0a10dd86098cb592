"""Existing WebDataset tars as a source, named by paths with ``{000..009}`` ranges, ``{a,b}`` or globs."""

from __future__ import annotations

import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from pipeline import storage
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.source_base import BadInput, Item, Partition, Sample, Source, SourceError, is_hidden, make_key, parse_label

# WebDataset's grouping rule: the key is the member name up to the first dot of its last component.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass(frozen=True)
class _Entry:
    key: str
    tar_index: int
    stem: str  # the WebDataset key inside the tar (or, for a bad member, the member's name)
    origin: str
    members: dict = field(default_factory=dict)  # ext -> TarInfo
    error: str | None = None  # a member that is an error row when listed (link, unsafe path, ...)


def _member_problem(member: tarfile.TarInfo, name: str) -> str | None:
    """Why a non-hidden member cannot be a sample's part, or None."""
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts:
        return f"unsafe path {member.name!r} in tar (absolute or with '..'): not read"
    if member.issym():
        return f"symlink member (-> {member.linkname!r}): not followed"
    if member.islnk():
        return f"hard link member (-> {member.linkname!r}): not followed"
    if not member.isfile():
        return "not a regular file member (device, fifo, ...)"
    return None


def _open_tar(location: str) -> tarfile.TarFile:
    """A tar opened for random access to its members (ranged reads on an object store)."""
    if not storage.is_uri(location):
        return tarfile.open(location)
    # tarfile leaves a passed-in file open when it closes; pyarrow closes it once it is released
    return tarfile.open(fileobj=storage.open_random_access(location), mode="r:*")


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
    """Existing WebDataset tars: samples are members grouped by key; ``cls`` gives the label.

    Hidden members are skipped (``is_hidden``); links, devices, unsafe paths (absolute or with
    ``..``) and duplicate members are each an error row naming the member.
    """

    kind = "webdataset"

    def __init__(self, spec: str, location: str, params: dict[str, str], partition_size: int | None):
        super().__init__(spec, params, partition_size)
        paths: list[str] = []
        for part in location.split("::"):
            expanded = expand_braces(part)
            if len(expanded) == 1 and any(c in part for c in "*?["):
                expanded = storage.glob(part)
            paths.extend(expanded if storage.is_uri(part) else [str(Path(p).expanduser().resolve()) for p in expanded])
        missing = [p for p in paths if not storage.exists(p)]
        if missing:
            raise SourceError(f"tar file(s) not found: {', '.join(missing[:5])}")
        if not paths:
            raise SourceError(f"no tar files match {location!r}")
        self.paths = paths
        # A key hashes the tar's path relative to the tars' common folder + the member's key, so the
        # same key in two tars gives two keys, and moving the whole set of tars changes none.
        base = posixpath.commonpath([posixpath.dirname(p) for p in paths])
        listing: list[_Entry] = []
        for tar_index, path in enumerate(paths):
            tar_id = posixpath.relpath(path, base)
            try:
                listing.extend(self._list_tar(tar_index, path, tar_id))
            except (tarfile.TarError, OSError) as e:
                raise SourceError(f"cannot read tar {path}: {e}") from None
        self._listing = listing
        if any("cls" in e.members for e in listing):
            self.classes = self._scan_classes()

    @staticmethod
    def _list_tar(tar_index: int, path: str, tar_id: str) -> list[_Entry]:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        out: list = []  # entries, and group stems as placeholders to keep member order
        with _open_tar(path) as tf:
            for member in tf.getmembers():
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if member.isdir() or not name or is_hidden(PurePosixPath(name).parts):
                    continue
                problem = _member_problem(member, name)
                m = _KEY_EXT.match(name)
                stem, ext = (m.group(1), m.group(2).lower()) if m else (name, "")
                if problem is None and ext in groups.get(stem, {}):
                    problem = f"duplicate member {member.name!r} in tar: only the first is read"
                if problem is not None:
                    ident = f"{tar_id}#member:{member.name}"
                    out.append(_Entry(make_key(ident, name), tar_index, member.name, f"{path}#{member.name}",
                                      error=problem))
                    continue
                if stem not in groups:
                    groups[stem] = {}
                    out.append(stem)
                groups[stem][ext] = member
        return [
            e if isinstance(e, _Entry) else _Entry(make_key(f"{tar_id}#{e}", e), tar_index, e, f"{path}#{e}", groups[e])
            for e in out
        ]

    def _scan_classes(self) -> list[str]:
        """Class ids seen in valid ``cls`` members (reads those small members only, not the images)."""
        seen: set[int] = set()
        by_tar: dict[int, list[_Entry]] = {}
        for e in self._listing:
            if "cls" in e.members:
                by_tar.setdefault(e.tar_index, []).append(e)
        for tar_index, entries in by_tar.items():
            with _open_tar(self.paths[tar_index]) as tf:
                for e in entries:
                    try:
                        seen.add(parse_label(tf.extractfile(e.members["cls"]).read()))
                    except (ValueError, OSError, tarfile.TarError):
                        pass  # reported as BadInput when the sample is read
        return [str(i) for i in range(max(seen) + 1)] if seen else []

    def _fingerprint_lines(self) -> Iterator[str]:
        for path in self.paths:
            size, mtime_ns = storage.stat(path)
            yield f"{path}\t{size}\t{mtime_ns}"

    def iter_partition(self, part: Partition) -> Iterator[Item]:
        refs = self._refs(part)
        open_tars: dict[int, tarfile.TarFile] = {}
        try:
            for ref in refs:
                if ref.error is None and ref.tar_index not in open_tars:
                    open_tars[ref.tar_index] = _open_tar(self.paths[ref.tar_index])
                yield self._read(open_tars.get(ref.tar_index), ref)
        finally:
            for tf in open_tars.values():
                tf.close()

    def _load(self, ref: _Entry) -> Item:
        if ref.error is not None:
            return self._read(None, ref)
        with _open_tar(self.paths[ref.tar_index]) as tf:
            return self._read(tf, ref)

    def _read(self, tf: tarfile.TarFile | None, ref: _Entry) -> Item:
        key, origin, members = ref.key, ref.origin, ref.members
        if ref.error is not None or tf is None:
            return BadInput(key, origin, ref.error or "unreadable member")
        image_exts = [e for e in members if e in IMAGE_EXTENSIONS]
        if not image_exts:
            return BadInput(key, origin, f"no image member (found: {', '.join(sorted(members)) or 'none'})")
        ext = image_exts[0]
        try:
            data = tf.extractfile(members[ext]).read()
        except (tarfile.TarError, OSError) as e:
            return BadInput(key, origin, f"cannot read member: {e}")
        label = None
        if "cls" in members:
            try:
                label = parse_label(tf.extractfile(members["cls"]).read())
            except (tarfile.TarError, OSError) as e:
                return BadInput(key, origin, f"cannot read label member: {e}")
            except ValueError as e:
                return BadInput(key, origin, f"bad label: {e}")
        return Sample(key, data, "jpg" if ext == "jpeg" else ext, label, origin)
