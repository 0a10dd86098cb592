"""Existing WebDataset tars as a source, named by paths with ``{000..009}`` ranges, ``{a,b}`` or globs."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Iterator

from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources import BadInput, Item, Partition, Sample, Source, SourceError, safe_key


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
        refs = self._refs(part)
        open_tars: dict[int, tarfile.TarFile] = {}
        try:
            for tar_index, stem, members in refs:
                if tar_index not in open_tars:
                    open_tars[tar_index] = tarfile.open(self.paths[tar_index])
                yield self._read(open_tars[tar_index], self.paths[tar_index], stem, members)
        finally:
            for tf in open_tars.values():
                tf.close()

    def _key(self, ref) -> str:
        return safe_key(ref[1])

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
