"""What every source reader shares: the item types, keys, labels, subsets and the ``Source`` base class.

The readers (``pipeline.source_folder``, ``source_tar``, ``source_idx``, ``source_shapes``) build on
this module; ``pipeline.sources`` opens a spec with the right one. See ``pipeline.sources`` for specs,
partitions, subsets, keys and hidden names.
"""


from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterator, Union
from urllib.parse import parse_qsl, urlencode

from pipeline.errors import SourceError

DEFAULT_PARTITION_SIZE = 512
MAX_CLASSES = 1_000_000  # labels are class indices in [0, MAX_CLASSES); anything else is an error row
KEY_HASH_CHARS = 10  # hex digits of sha256 in a key: 40 bits, on top of the readable prefix
KEY_PREFIX_CHARS = 64  # the readable part is cut here; the hash keeps long names apart
SUBSET_OPTIONS = ("n", "sample", "subset_seed")


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


def safe_key(text: str) -> str:
    """A WebDataset-safe key: letters, digits, ``_`` and ``-``; anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def make_key(identity: str, readable: str) -> str:
    """``<readable prefix>-<10 hex of sha256(identity)>``: unique per exact identity, stable, no dots.

    ``identity`` is what tells an item apart (a folder file's relative path, a tar member's stem);
    ``readable`` is folded to ASCII (accents dropped, others become ``_``) so reports stay legible.
    """
    folded = "".join(c for c in unicodedata.normalize("NFKD", readable) if not unicodedata.combining(c))
    prefix = safe_key(folded)[:KEY_PREFIX_CHARS] or "item"
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:KEY_HASH_CHARS]
    return f"{prefix}-{digest}"


def is_hidden(parts: tuple[str, ...] | list[str]) -> bool:
    """Hidden: any path component starting with ``.`` (``.`` and ``..`` themselves are not names)."""
    return any(p.startswith(".") and p not in (".", "..") for p in parts)


def parse_label(raw: bytes | str) -> int:
    """A class index from a ``cls`` value; ``ValueError`` (with the reason) unless an integer in range."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    if not re.fullmatch(r"-?[0-9]+", text):
        raise ValueError(f"label {text[:20]!r} is not an integer")
    label = int(text)
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"label {label} out of range [0, {MAX_CLASSES})")
    return label


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``body?k=v&...`` -> (body, {k: v})."""
    body, _, query = str(spec).partition("?")
    return body, dict(parse_qsl(query, keep_blank_values=True))


def with_params(spec: str, **changes: object) -> str:
    """The spec with options set (``None`` removes one); the one way specs get edited."""
    body, params = split_spec(spec)
    for name, value in changes.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = str(value)
    return f"{body}?{urlencode(params, safe='/:{},.*')}" if params else body


@dataclass(frozen=True)
class Subset:
    """``n`` first items, or a seeded random ``sample`` of them (see the module docstring)."""

    n: int | None = None
    sample: int | None = None
    seed: int = 0

    @classmethod
    def pop_from(cls, params: dict[str, str], spec: str) -> "Subset":
        values: dict[str, int] = {}
        for name in SUBSET_OPTIONS:
            if name in params:
                raw = params.pop(name)
                if not re.fullmatch(r"[0-9]+", raw.strip()) or (name != "subset_seed" and int(raw) < 1):
                    raise SourceError(f"source option {name}={raw!r} in {spec!r}: expected a positive integer")
                values[name] = int(raw)
        if "subset_seed" in values and "sample" not in values:
            raise SourceError(f"subset_seed without sample in {spec!r}: it seeds sample=N")
        return cls(values.get("n"), values.get("sample"), values.get("subset_seed", 0))

    def __bool__(self) -> bool:
        return self.n is not None or self.sample is not None

    def describe(self) -> str:
        first = [f"n={self.n}"] if self.n is not None else []
        return "&".join(first + ([f"sample={self.sample}&subset_seed={self.seed}"] if self.sample else []))

    def select(self, keys: list[str]) -> list[int]:
        """Indices (in source order) of the items kept: the first ``n``, then ``sample`` of those."""
        kept = list(range(min(self.n, len(keys)) if self.n is not None else len(keys)))
        if self.sample is None or self.sample >= len(kept):
            return kept

        def rank(i: int) -> bytes:
            return hashlib.sha256(f"subset:{self.seed}:{keys[i]}".encode()).digest()

        return sorted(sorted(kept, key=rank)[: self.sample])


class Source:
    """Base class: subclasses fill ``_listing`` (ordered refs) and implement ``_load``."""

    kind = "source"

    def __init__(self, spec: str, params: dict[str, str], partition_size: int | None):
        self.spec = spec
        self.params = params
        self.partition_size = int(params.pop("partition_size", partition_size or DEFAULT_PARTITION_SIZE))
        self.subset = Subset.pop_from(params, spec)
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

    def keys(self) -> list[str]:
        """Every item's key in listing order, without reading any item."""
        return [self._key(ref) for ref in self._listing]

    def fingerprint(self) -> str:
        """Changes when the listing changes (names, sizes, mtimes, generator parameters, subset)."""
        h = hashlib.sha256(self.kind.encode())
        for line in self._fingerprint_lines():
            h.update(line.encode() + b"\n")
        if self.subset:
            h.update(f"subset\t{self.subset.describe()}\n".encode())
        return h.hexdigest()[:16]

    def _finish_listing(self) -> None:
        """Once a reader has listed everything: refuse duplicate keys, then take the subset."""
        seen: dict[str, object] = {}
        for ref in self._listing:
            key = self._key(ref)
            if key in seen:
                raise SourceError(
                    f"two items map to key {key!r}: {self._ref_origin(seen[key])} and {self._ref_origin(ref)}"
                )
            seen[key] = ref
        if self.subset:
            keys = list(seen)
            self._listing = [self._listing[i] for i in self.subset.select(keys)]

    def describe(self) -> str:
        cls = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"{self.kind} source {self.spec!r}: {len(self)} items, {cls}, {self.default_partitions()} partitions"

    def _key(self, ref) -> str:
        """The key ``_load(ref)`` gives its item, without reading it (folder and tar refs carry it)."""
        return ref.key

    def _ref_origin(self, ref) -> str:
        return ref.origin

    def _fingerprint_lines(self) -> Iterator[str]:
        raise NotImplementedError

    def _load(self, ref) -> Item:
        raise NotImplementedError
