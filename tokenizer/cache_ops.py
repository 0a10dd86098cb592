"""Keeping token caches current: ``refresh`` (rebuild only what is stale), ``gc``, ``list_caches``.

Under an output root every tokenizer has its own cache, ``out/<tokenizer_id>/``. A new tokenizer
therefore means a new cache beside the old one (which stays readable); a changed source means
rebuilding, inside the same cache, the partitions whose content changed (``precompute``), with the
old manifest valid until the new one is committed. ``gc`` removes what no committed manifest of the
current cache needs: other tokenizers' caches, shards a rebuild replaced, stale records, temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.token_cache import CACHE_FORMAT, MANIFEST, CacheError, CacheInfo, read_cache_info, read_manifest
from pipeline.views import ViewStyle
from tokenizer.cache_records import BUILD_DIR, LEGACY, OWN_FILE, RECORD, load_records, remove_temporaries


@dataclass
class CacheEntry:
    tokenizer_id: str
    path: str
    info: CacheInfo | None  # None: no committed manifest (a build in progress or interrupted), or unreadable
    complete: bool  # has a committed manifest


def list_caches(out_root: str) -> list[CacheEntry]:
    """The caches under ``out_root`` (directories with a manifest or build records), oldest first."""
    entries = []
    for name in storage.list_names(out_root):
        path = storage.join(out_root, name)
        if not storage.is_dir(path):
            continue
        complete = storage.exists(storage.join(path, MANIFEST))
        if not complete and not storage.is_dir(storage.join(path, BUILD_DIR)):
            continue  # not ours: never touched
        info = None
        if complete:
            try:
                info = read_cache_info(path, any_format=True)  # an older format is refreshed in place
            except CacheError:
                info = None
        entries.append(CacheEntry(name, path, info, complete))
    return sorted(entries, key=lambda e: (e.info.created if e.info else "", e.tokenizer_id))


@dataclass
class RefreshReport:
    cache_dir: str
    tokenizer_id: str
    reason: str  # why something was (or was not) built
    up_to_date: bool
    superseded: list[str] = field(default_factory=list)  # other caches under out_root
    removed: list[str] = field(default_factory=list)  # what --gc deleted
    build: Any = None  # precompute.BuildReport


def refresh(
    tokenizer_dir: str,
    out_root: str,
    source_spec: str | None = None,
    views: int | None = None,
    *,
    seed: int | None = None,
    batch_size: int = 64,
    num_actors: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    gc: bool = False,
    progress_every: float = 5.0,
    style: dict[str, Any] | None = None,
) -> RefreshReport:
    """Bring ``out_root/<tokenizer_id>`` up to date; source, views, seed and view style default to the
    last cache's (``style``: the ``ViewStyle`` fields to change, e.g. ``{"jitter": 0.4}``)."""
    from pipeline.sources import open_source
    from tokenizer.checkpoint import tokenizer_id
    from tokenizer.precompute import build_cache

    tok_id = tokenizer_id(tokenizer_dir)
    caches = list_caches(out_root)
    current = next((c for c in caches if c.tokenizer_id == tok_id), None)
    others = [c for c in caches if c.tokenizer_id != tok_id]
    template = current if current and current.info else next((c for c in reversed(others) if c.info), None)
    if source_spec is None:
        if template is None:
            raise CacheError(f"no earlier cache under {out_root} to take the source from: pass --source")
        source_spec = template.info.source
    if views is None:
        views = template.info.views if template else 1
    if seed is None:
        seed = template.info.seed if template else 0
    view_style = (ViewStyle.parse(template.info.view_style) if template else ViewStyle()).with_(**(style or {}))

    if current is None or current.info is None:
        reason = "no cache for this tokenizer yet" if current is None else "the last build did not finish"
        if others and current is None:
            reason = f"new tokenizer {tok_id} (supersedes {', '.join(c.tokenizer_id for c in others)})"
    else:
        info = current.info
        fingerprint = open_source(source_spec).fingerprint()
        if info.format != CACHE_FORMAT:
            reason = f"cache format {info.format} -> {CACHE_FORMAT} (one .mim member per sample): every shard is rebuilt"
        elif info.source != source_spec:
            reason = f"source changed: {info.source!r} -> {source_spec!r}"
        elif info.source_fingerprint != fingerprint:
            reason = f"source content changed (fingerprint {info.source_fingerprint} -> {fingerprint})"
        elif (info.views, info.seed, info.view_style) != (views, seed, view_style.key()):
            reason = "views, seed or view style changed"
        else:
            reason = "unchanged"
    print(f"tokens refresh: {reason}", flush=True)
    build = build_cache(
        tokenizer_dir,
        source_spec,
        out_root,
        views,
        batch_size=batch_size,
        num_actors=num_actors,
        seed=seed,
        address=address,
        num_cpus=num_cpus,
        progress_every=progress_every,
        style=view_style,
    )
    report = RefreshReport(
        build.cache_dir,
        tok_id,
        reason,
        build.up_to_date,
        superseded=[c.path for c in others],
        build=build,
    )
    if gc:
        report.removed = collect_garbage(out_root, keep=tok_id)
        for path in report.removed:
            print(f"tokens refresh --gc: removed {path}", flush=True)
        report.superseded = []
    elif others:
        print(
            f"tokens refresh: {len(others)} superseded cache(s) under {out_root} kept "
            f"({', '.join(c.tokenizer_id for c in others)}); --gc removes them",
            flush=True,
        )
    return report


def _remove_own_files(cache_dir: str, keep: set[str]) -> list[str]:
    """Remove the files a build writes (shards, errors files, manifest, temporaries, records) that are
    not in ``keep``; anything else in the directory (a user's notes, say) is left alone."""
    removed = []
    for name in storage.list_names(cache_dir):
        if name in keep or not (OWN_FILE.fullmatch(name) or name in LEGACY):
            continue
        path = storage.join(cache_dir, name)
        storage.remove(path)
        removed.append(path)
    return removed + remove_temporaries(cache_dir)


def collect_garbage(out_root: str, keep: str) -> list[str]:
    """Remove other tokenizers' caches under ``out_root`` and, inside ``keep``'s committed cache,
    every file of its making that its manifest does not need. Only files a build writes are removed
    (never, say, a user's notes beside them); a directory goes only once it is empty. Returns the
    removed paths. An uncommitted cache is left as it is (its files are a build in progress)."""
    removed: list[str] = []
    for entry in list_caches(out_root):
        if entry.tokenizer_id != keep:
            removed += _remove_own_files(entry.path, keep=set())
            removed += _remove_records(entry.path, lambda rec: False)
            build = storage.join(entry.path, BUILD_DIR)
            for folder in (build, entry.path):
                if storage.is_dir(folder) and not storage.list_names(folder):
                    storage.remove(folder)
                    removed.append(folder)
    cache_dir = storage.join(out_root, keep)
    if not storage.exists(storage.join(cache_dir, MANIFEST)):
        return removed
    info = read_cache_info(cache_dir)
    listed = {r["shard"]: r["sha256"] for r in read_manifest(cache_dir)}
    removed += _remove_own_files(cache_dir, keep=set(listed) | {MANIFEST, info.errors_file})

    def needed(rec: dict[str, Any]) -> bool:
        if rec.get("partitions") != info.partitions:
            return False
        if rec.get("shard") is not None:
            return listed.get(rec["shard"]) == rec.get("sha256")
        # a partition with no usable image: needed while it is part of the committed source
        return rec.get("source_fingerprint") == info.source_fingerprint

    return removed + _remove_records(cache_dir, needed)


def _remove_records(cache_dir: str, needed) -> list[str]:
    """Remove the completion records (our file names only) that ``needed`` rejects, and unreadable ones."""
    build = storage.join(cache_dir, BUILD_DIR)
    recs = {rec["_record"]: rec for rec in load_records(cache_dir)}
    removed = []
    for name in storage.list_names(build):
        if RECORD.fullmatch(name) and not (name in recs and needed(recs[name])):
            path = storage.join(build, name)
            storage.remove(path)
            removed.append(path)
    return removed
