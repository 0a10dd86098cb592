"""Codebook geometry with FAISS: nearest other code, near-duplicate pairs, k-means groups, and how
dead codes sit among them."""

from __future__ import annotations

from typing import Any

import numpy as np

from eval.codebook import faiss_ops


def run_geometry(codebook: np.ndarray, counts: np.ndarray, threshold: float, clusters: int | None, use_gpu: bool | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    nn = faiss_ops.nearest_codes(codebook, use_gpu=use_gpu)
    pairs, cos = faiss_ops.near_duplicates(codebook, threshold)
    km = faiss_ops.kmeans(codebook, clusters, use_gpu=use_gpu)
    dead = counts == 0
    a = km["assignment"]
    size = np.bincount(a, minlength=km["clusters"])
    dead_per = np.bincount(a, weights=dead.astype(np.float64), minlength=km["clusters"])
    share = np.bincount(a, weights=counts.astype(np.float64), minlength=km["clusters"]) / max(1, counts.sum())
    in_pair = np.zeros(counts.size, dtype=bool)
    in_pair[pairs.ravel()] = True

    def summary(x: np.ndarray) -> dict[str, float]:
        return {"min": float(x.min()), "median": float(np.median(x)), "mean": float(x.mean()), "max": float(x.max())}

    geometry = {
        "dim": int(codebook.shape[1]),
        "normalised": faiss_ops.is_normalised(codebook),
        "faiss_gpu": bool(faiss_ops.gpu_available() if use_gpu is None else use_gpu),
        "nearest_cosine": summary(nn["cosine"]),
        "nearest_distance": summary(nn["distance"]),
        "duplicate_threshold": threshold,
        "duplicate_pairs": int(len(pairs)),
        "codes_in_duplicate_pairs": int(in_pair.sum()),
        "top_duplicates": [
            {"a": int(i), "b": int(j), "cosine": float(c), "count_a": int(counts[i]), "count_b": int(counts[j])}
            for (i, j), c in zip(pairs[:100], cos[:100])
        ],
        "dead_nearest_cosine_median": float(np.median(nn["cosine"][dead])) if dead.any() else None,
        "live_nearest_cosine_median": float(np.median(nn["cosine"][~dead])) if (~dead).any() else None,
        "kmeans": {
            "clusters": km["clusters"],
            "spherical": km["spherical"],
            "objective": km["objective"],
            "all_dead_clusters": int(((dead_per == size) & (size > 0)).sum()),
            "groups": [
                {"cluster": c, "codes": int(size[c]), "dead": int(dead_per[c]), "token_share": float(share[c])}
                for c in range(km["clusters"])
            ],
        },
    }
    columns = {"nearest_code": nn["nearest"], "nearest_distance": nn["distance"], "nearest_cosine": nn["cosine"],
               "cluster": a, "in_duplicate_pair": in_pair}
    return geometry, columns
