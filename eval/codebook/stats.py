"""Codebook usage figures from token histograms: pure numpy, no Ray, no FAISS.

Conventions (the report and its tests rely on them):

- ``counts`` is an integer histogram over the K codes; ``p = counts / counts.sum()``.
- entropy is in bits: ``H = -sum p log2 p`` (0 log 0 = 0); perplexity ``= 2 ** H`` is the number of
  equally used codes that would give the same entropy (K when usage is uniform, 1 when one code
  takes every token).
- the top-1% share is the fraction of all tokens taken by the ``ceil(K / 100)`` most used codes.
- drift of a shard is the Jensen-Shannon divergence, base 2 (so in [0, 1]), between the shard's
  histogram and the whole dataset's.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def probabilities(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def entropy_bits(counts: np.ndarray) -> float:
    p = probabilities(counts)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def perplexity(counts: np.ndarray) -> float:
    return float(2.0 ** entropy_bits(counts)) if np.asarray(counts).sum() > 0 else 0.0


def top_share(counts: np.ndarray, fraction: float = 0.01) -> tuple[int, float]:
    """(number of top codes, share of all tokens they take) for the top ``fraction`` of the codebook."""
    counts = np.asarray(counts)
    n_top = max(1, math.ceil(fraction * counts.size))
    total = counts.sum()
    if total == 0:
        return n_top, 0.0
    top = np.sort(counts)[::-1][:n_top]
    return n_top, float(top.sum() / total)


def js_divergence(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) between two histograms (normalised here)."""
    p, q = probabilities(a), probabilities(b)
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of code usage: 0 = every code used equally, → 1 = one code takes all."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2 * (ranks * x).sum()) / (n * total) - (n + 1) / n)


def usage_figures(counts: np.ndarray) -> dict[str, Any]:
    """Every whole-dataset figure of one histogram."""
    counts = np.asarray(counts, dtype=np.int64)
    k = int(counts.size)
    used = int((counts > 0).sum())
    h = entropy_bits(counts)
    ppl = perplexity(counts)
    n_top, share = top_share(counts, 0.01)
    total = int(counts.sum())
    return {
        "vocab_size": k,
        "tokens": total,
        "codes_used": used,
        "used_fraction": used / k if k else 0.0,
        "dead_codes": k - used,
        "dead_fraction": (k - used) / k if k else 0.0,
        "entropy_bits": h,
        "max_entropy_bits": math.log2(k) if k else 0.0,
        "normalised_entropy": h / math.log2(k) if k > 1 else 0.0,
        "perplexity": ppl,
        "perplexity_over_k": ppl / k if k else 0.0,
        "top1pct_codes": n_top,
        "top1pct_share": share,
        "gini": gini(counts),
        "max_code_share": float(counts.max() / total) if total else 0.0,
        "median_count_of_used": float(np.median(counts[counts > 0])) if used else 0.0,
        "codes_below_1pct_of_uniform": int(((counts > 0) & (counts < 0.01 * total / max(k, 1))).sum()),
    }


def usage_curve(counts: np.ndarray, points: int = 128) -> dict[str, list]:
    """The sorted-usage curve at ~``points`` log-spaced ranks (for comparing reports without parquet)."""
    p = np.sort(probabilities(counts))[::-1]
    k = p.size
    ranks = np.unique(np.round(np.geomspace(1, k, num=min(points, k))).astype(np.int64))
    return {"rank": ranks.tolist(), "frequency": [float(p[r - 1]) for r in ranks]}


def shard_drift(shard_counts: Sequence[np.ndarray], total: np.ndarray) -> list[float]:
    return [js_divergence(c, total) for c in shard_counts]


def drift_baseline(n_tokens: int, total: np.ndarray, draws: int = 3, seed: int = 0) -> float:
    """The drift a shard of ``n_tokens`` shows by chance alone: mean JS divergence from the whole of
    ``draws`` multinomial samples of that size drawn from the whole's own distribution. A small
    shard over a large codebook drifts this much with nothing wrong; compare a shard's drift to it."""
    p = probabilities(total)
    if n_tokens <= 0 or p.sum() == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    return float(np.mean([js_divergence(rng.multinomial(int(n_tokens), p), total) for _ in range(draws)]))


def per_class_figures(class_counts: np.ndarray, names: Sequence[str] | None = None, matrix_limit: int = 64) -> dict[str, Any]:
    """Per-class usage from a [C, K] histogram (row c: tokens of images labelled c).

    - per class: tokens, codes used, perplexity, codes used by that class alone;
    - ``mutual_information_bits``: I(code; class), how much a token says about the image's class;
    - ``overlap``: C×C histogram intersection sum_k min(p_a, p_b) (1 = same usage, 0 = disjoint),
      kept only for C <= ``matrix_limit``.
    """
    class_counts = np.asarray(class_counts, dtype=np.int64)
    c, k = class_counts.shape
    present = class_counts.sum(axis=1) > 0
    names = list(names) if names is not None else [str(i) for i in range(c)]
    if len(names) < c:
        names = names + [str(i) for i in range(len(names), c)]
    used = class_counts > 0
    n_classes_using = used.sum(axis=0)  # per code
    exclusive = (used & (n_classes_using[None, :] == 1)).sum(axis=1)
    classes = []
    for i in range(c):
        if not present[i]:
            continue
        row = class_counts[i]
        classes.append(
            {
                "label": i,
                "name": names[i],
                "tokens": int(row.sum()),
                "codes_used": int(used[i].sum()),
                "used_fraction": float(used[i].sum() / k),
                "perplexity": perplexity(row),
                "exclusive_codes": int(exclusive[i]),
            }
        )
    joint = probabilities(class_counts.ravel()).reshape(c, k)
    pc, pk = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (pc[:, None] * pk[None, :])[nz])).sum()) if nz.any() else 0.0
    h_class = entropy_bits(pc)
    out: dict[str, Any] = {
        "classes": classes,
        "num_classes": int(present.sum()),
        "mean_codes_used_per_class": float(np.mean([x["codes_used"] for x in classes])) if classes else 0.0,
        "codes_exclusive_to_one_class": int((n_classes_using == 1).sum()),
        "codes_used_by_every_class": int((n_classes_using == present.sum()).sum()) if present.any() else 0,
        "mutual_information_bits": mi,
        "class_entropy_bits": h_class,
        "mi_over_class_entropy": mi / h_class if h_class > 0 else 0.0,
    }
    idx = np.flatnonzero(present)
    if 0 < idx.size <= matrix_limit:
        p = np.stack([probabilities(class_counts[i]) for i in idx])
        overlap = np.minimum(p[:, None, :], p[None, :, :]).sum(axis=2)
        out["overlap"] = {"labels": [names[i] for i in idx], "matrix": np.round(overlap, 6).tolist()}
    return out


def log_bins(counts: np.ndarray) -> tuple[list[str], list[int]]:
    """Usage histogram: dead codes, then codes whose count falls in [2^i, 2^(i+1))."""
    counts = np.asarray(counts, dtype=np.int64)
    labels, values = ["0 (dead)"], [int((counts == 0).sum())]
    live = counts[counts > 0]
    if live.size:
        top = int(np.floor(np.log2(live.max())))
        for i in range(top + 1):
            lo, hi = 2**i, 2 ** (i + 1)
            labels.append(f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}")
            values.append(int(((live >= lo) & (live < hi)).sum()))
    return labels, values
