"""Keeping token caches current: ``refresh`` (rebuild only what is stale), ``gc``, ``list_caches``.

Under an output root every tokenizer has its own cache, ``out/<tokenizer_id>/``. A new tokenizer
therefore means a new cache beside the old one (which stays readable); a changed source means
rebuilding, inside the same cache, the partitions whose content changed (``precompute``), with the
old manifest valid until the new one is committed. ``gc`` removes what no committed manifest of the
current cache needs: other tokenizers' caches, shards a rebuild replaced, stale records, temporaries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.shards import CACHE_INFO, ERRORS, MANIFEST, CacheError, read_manifest
from tokenizer.cache_records import BUILD_DIR, load_records


@dataclass
class CacheEntry:
    tokenizer_id: str
    path: str
    info: dict[str, Any]
    complete: bool  # has a committed manifest


def list_caches(out_root: str) -> list[CacheEntry]:
    """The caches under ``out_root`` (directories with a cache.json or build records), oldest first."""
    entries = []
    for name in storage.list_names(out_root):
        path = storage.join(out_root, name)
        if not storage.is_dir(path):
            continue
        info_loc = storage.join(path, CACHE_INFO)
        info: dict[str, Any] = {}
        if storage.exists(info_loc):
            try:
                info = json.loads(storage.read_bytes(info_loc))
            except ValueError:
                info = {}
        elif not storage.is_dir(storage.join(path, BUILD_DIR)):
            continue  # not ours: never touched
        entries.append(CacheEntry(name, path, info, storage.exists(storage.join(path, MANIFEST))))
    return sorted(entries, key=lambda e: (str(e.info.get("created", "")), e.tokenizer_id))


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
) -> RefreshReport:
    """Bring ``out_root/<tokenizer_id>`` up to date; source, views and seed default to the last cache's."""
    from pipeline.sources import open_source
    from tokenizer.base import tokenizer_id
    from tokenizer.precompute import run_build

    tok_id = tokenizer_id(tokenizer_dir)
    caches = list_caches(out_root)
    current = next((c for c in caches if c.tokenizer_id == tok_id), None)
    others = [c for c in caches if c.tokenizer_id != tok_id]
    template = current if current and current.info else next((c for c in reversed(others) if c.info), None)
    if source_spec is None:
        if template is None:
            raise CacheError(f"no earlier cache under {out_root} to take the source from: pass --source")
        source_spec = template.info["source"]
    if views is None:
        views = int(template.info.get("views", 1)) if template else 1
    if seed is None:
        seed = int(template.info.get("seed", 0)) if template else 0

    if current is None or not current.complete:
        reason = "no cache for this tokenizer yet" if current is None else "the last build did not finish"
        if others and current is None:
            reason = f"new tokenizer {tok_id} (supersedes {', '.join(c.tokenizer_id for c in others)})"
    else:
        info = current.info
        fingerprint = open_source(source_spec).fingerprint()
        if info.get("source") != source_spec:
            reason = f"source changed: {info.get('source')!r} -> {source_spec!r}"
        elif info.get("source_fingerprint") != fingerprint:
            reason = f"source content changed (fingerprint {info.get('source_fingerprint')} -> {fingerprint})"
        elif (info.get("views"), info.get("seed")) != (views, seed):
            reason = "views or seed changed"
        else:
            reason = "unchanged"
    print(f"tokens refresh: {reason}", flush=True)
    build = run_build(
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


def collect_garbage(out_root: str, keep: str) -> list[str]:
    """Remove other tokenizers' caches under ``out_root`` and, inside ``keep``'s committed cache,
    every file its manifest does not need. Returns the removed paths. An uncommitted cache is left as
    it is (its files are a build in progress)."""
    removed: list[str] = []
    for entry in list_caches(out_root):
        if entry.tokenizer_id != keep:
            storage.remove(entry.path)
            removed.append(entry.path)
    cache_dir = storage.join(out_root, keep)
    if not storage.exists(storage.join(cache_dir, MANIFEST)):
        return removed
    rows = read_manifest(cache_dir)
    listed = {r["shard"]: r["sha256"] for r in rows}
    info = json.loads(storage.read_bytes(storage.join(cache_dir, CACHE_INFO)))
    keep_files = set(listed) | {MANIFEST, ERRORS, CACHE_INFO, BUILD_DIR}
    for name in storage.list_names(cache_dir):
        if name not in keep_files:
            path = storage.join(cache_dir, name)
            storage.remove(path)
            removed.append(path)
    for rec in load_records(cache_dir):
        shard = rec.get("shard")
        if shard is not None:
            needed = listed.get(shard) == rec.get("sha256")
        else:  # a partition with no usable image: needed while it is part of the committed source
            needed = (
                rec.get("source_fingerprint") == info.get("source_fingerprint")
                and rec.get("partition", 1 << 62) < info.get("partitions", 0)
            )
        if not needed:
            path = storage.join(cache_dir, BUILD_DIR, rec["_record"])
            storage.remove(path)
            removed.append(path)
    for name in storage.list_names(storage.join(cache_dir, BUILD_DIR)):
        if ".tmp-" in name:
            path = storage.join(cache_dir, BUILD_DIR, name)
            storage.remove(path)
            removed.append(path)
    return removed
