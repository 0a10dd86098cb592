"""``--compare OTHER``: what changed between two reports (two tokenizers, or two caches of one)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from eval.codebook.stats import js_divergence
from pipeline import storage
from pipeline.errors import StageError

# (label, path into report.json, True when higher is better / None when neutral)
# the rows the terminal summary prints (the HTML and report.json have all of them)
KEY_FIGURES = ("tokenizer", "codes used %", "dead codes", "perplexity", "perplexity / K", "top 1% share",
               "max shard drift (JS bits)", "agreement with cache")
FIGURES = [
    ("tokenizer", ("cache", "tokenizer_id"), None),
    ("codebook size K", ("usage", "vocab_size"), None),
    ("tokens", ("usage", "tokens"), None),
    ("codes used", ("usage", "codes_used"), True),
    ("codes used %", ("usage", "used_fraction"), True),
    ("dead codes", ("usage", "dead_codes"), False),
    ("perplexity", ("usage", "perplexity"), True),
    ("perplexity / K", ("usage", "perplexity_over_k"), True),
    ("entropy (bits)", ("usage", "entropy_bits"), True),
    ("top 1% share", ("usage", "top1pct_share"), False),
    ("Gini", ("usage", "gini"), False),
    ("max shard drift (JS bits)", ("shards", "drift_max"), False),
    ("agreement with cache", ("agreement", "agreement"), True),
    ("near-duplicate pairs", ("geometry", "duplicate_pairs"), False),
    ("median nearest cosine", ("geometry", "nearest_cosine", "median"), False),
    ("I(code; class) bits", ("classes", "mutual_information_bits"), True),
]


def _get(doc: dict, path: tuple) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def load_other(location: str) -> tuple[dict[str, Any], str]:
    """The other report.json (or a report directory holding one) and its directory."""
    loc = str(location)
    if storage.is_dir(loc):
        loc = storage.join(loc, "report.json")
    if not storage.exists(loc):
        raise StageError(f"--compare: no report at {location} (give a report.json or the directory holding one)")
    try:
        doc = json.loads(storage.read_bytes(loc))
    except ValueError as e:
        raise StageError(f"--compare: {loc} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "usage" not in doc or "cache" not in doc:
        raise StageError(f"--compare: {loc} is not a codebook report (no 'usage'/'cache' sections)")
    return doc, loc.rsplit("/", 1)[0] if storage.is_uri(loc) else os.path.dirname(os.path.abspath(loc))


def other_counts(other_dir: str, vocab_size: int) -> np.ndarray | None:
    """The other report's histogram from its codes.parquet, when it is there."""
    from pipeline.token_cache import read_parquet

    path = storage.join(other_dir, "codes.parquet")
    if not storage.exists(path):
        return None
    table = read_parquet(path)
    if table.num_rows != vocab_size:
        return None
    counts = np.zeros(vocab_size, dtype=np.int64)
    counts[np.asarray(table.column("code"))] = np.asarray(table.column("count"))
    return counts


def compare(this: dict[str, Any], counts: np.ndarray, location: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """Side-by-side rows, plus per-code changes when both reports share a tokenizer and K.
    Returns (compare section, the other's counts or None)."""
    other, other_dir = load_other(location)
    rows = []
    for label, path, higher_better in FIGURES:
        a, b = _get(this, path), _get(other, path)
        if a is None and b is None:
            continue
        change: Any = ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            d = a - b
            change = f"{d:+,}" if isinstance(d, int) else f"{d:+.4g}"
            if higher_better is not None and d != 0:
                change += " (better)" if (d > 0) == higher_better else " (worse)"
        elif a is not None and b is not None and a != b:
            change = "differs"
        rows.append({"figure": label, "this": a, "other": b, "change": change})
    section: dict[str, Any] = {"other": str(location), "rows": rows}
    k = this["usage"]["vocab_size"]
    theirs = other_counts(other_dir, k) if other["usage"].get("vocab_size") == k else None
    if theirs is not None and other["cache"].get("tokenizer_id") == this["cache"].get("tokenizer_id"):
        section["histogram_js"] = js_divergence(counts, theirs)
        section["dead_here_only"] = int(((counts == 0) & (theirs > 0)).sum())
        section["dead_there_only"] = int(((counts > 0) & (theirs == 0)).sum())
    section["other_curve"] = other.get("usage_curve")
    section["other_label"] = f"other: {other['cache'].get('tokenizer_id')}"
    return section, theirs
