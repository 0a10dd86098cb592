"""Weighted kNN classification on frozen features, as DINO evaluates (FAISS cosine search).

Features are l2-normalised, searched with an exact inner-product index (``IndexFlatIP``: cosine
similarity), and each of the k nearest training samples votes for its class with weight
``exp(similarity / T)``; top-1 and top-5 are read from the summed votes.
"""

from __future__ import annotations

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_votes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """Summed, temperature-weighted votes ``[N_test, num_classes]``."""
    import faiss

    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("kNN needs at least one training and one test sample")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = max(1, min(int(k), len(train_x)))
    xb, xq = l2_normalise(train_x), l2_normalise(test_x)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    sims, idx = index.search(xq, k)  # [N, k], best first
    weights = np.exp((sims - 1.0) / temperature)  # exp(s/T) up to a per-row constant: no overflow
    votes = np.zeros((len(xq), num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(xq)), k)
    np.add.at(votes, (rows, np.asarray(train_y)[idx].ravel()), weights.ravel())
    return votes


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    order = np.argsort(-scores, axis=1, kind="stable")
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        out[k] = float((order[:, :kk] == np.asarray(labels)[:, None]).any(axis=1).mean())
    return out


def knn_eval(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> dict:
    """``{"top1", "top5", "k", "temperature", "n_train", "n_test"}`` (accuracies in [0, 1])."""
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    votes = knn_votes(train_x, train_y, test_x, num_classes=num_classes, k=k, temperature=temperature)
    acc = topk_accuracy(votes, test_y)
    return {
        "top1": acc[1],
        "top5": acc[5],
        "k": min(int(k), len(train_x)),
        "temperature": float(temperature),
        "n_train": int(len(train_x)),
        "n_test": int(len(test_x)),
    }
