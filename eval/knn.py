"""Weighted kNN classification on frozen features, as DINO evaluates (FAISS cosine search).

Features are l2-normalised, searched with an inner-product index (cosine similarity), and each of
the k nearest training samples votes for its class with weight ``exp(similarity / T)``; top-1 and
top-5 are read from the summed votes.

The index is exact (``IndexFlatIP``, float32: 4 x N x D bytes) while the training features fit the
memory budget (``memory_mb``); past it (or with ``index="ivf"``) it is an IVF index over 8-bit
scalar-quantised vectors (``IndexIVFScalarQuantizer``: N x D bytes, a quarter of flat), whose
``nprobe`` nearest of ``nlist`` lists are searched per query. With every list probed, the search
is exhaustive over the quantised vectors: the same top-1 as flat up to the quantisation
(``tests/test_eval_scale.py`` states the tolerance).
"""

from __future__ import annotations

import math

import numpy as np

INDEX_KINDS = ("auto", "flat", "ivf")
IVF_TRAIN_PER_LIST = 64  # k-means training vectors per list (FAISS warns below 39)
ADD_CHUNK = 65536  # vectors normalised and added at a time: no second full copy of the features


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def choose_index(n: int, dim: int, kind: str = "auto", memory_mb: float | None = None) -> str:
    """``"flat"`` or ``"ivf"``: auto picks flat while its float32 vectors fit ``memory_mb``."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"knn index must be one of {INDEX_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    return "flat" if memory_mb is None or 4.0 * n * dim <= memory_mb * 2**20 else "ivf"


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists, with enough training vectors per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // IVF_TRAIN_PER_LIST or 1))


def build_index(train_x: np.ndarray, kind: str, *, nlist: int | None = None, nprobe: int = 32, seed: int = 0):
    """A FAISS inner-product index over the l2-normalised rows of ``train_x`` (``"flat"`` or ``"ivf"``)."""
    import faiss

    n, d = train_x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(nlist or default_nlist(n)), n))
        quantiser = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantiser, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).permutation(n)[: nlist * IVF_TRAIN_PER_LIST]
        index.train(l2_normalise(train_x[np.sort(sample)]))
        index.nprobe = max(1, min(int(nprobe), nlist))
    else:
        raise ValueError(f"index kind must be flat or ivf, got {kind!r}")
    for start in range(0, n, ADD_CHUNK):
        index.add(l2_normalise(train_x[start : start + ADD_CHUNK]))
    return index


def knn_votes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 32,
) -> np.ndarray:
    """Summed, temperature-weighted votes ``[N_test, num_classes]``."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("kNN needs at least one training and one test sample")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = max(1, min(int(k), len(train_x)))
    faiss_index = build_index(train_x, index, nlist=nlist, nprobe=nprobe)
    sims, idx = faiss_index.search(l2_normalise(test_x), k)  # [N, k], best first
    found = idx >= 0  # an IVF search that probes few lists can find fewer than k
    weights = np.where(found, np.exp((sims - 1.0) / temperature), 0.0)  # exp(s/T) up to a per-row constant: no overflow
    votes = np.zeros((len(test_x), num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(test_x)), k)
    np.add.at(votes, (rows, np.asarray(train_y)[np.where(found, idx, 0)].ravel()), weights.ravel())
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
    index: str = "auto",
    memory_mb: float | None = None,
    nlist: int | None = None,
    nprobe: int = 32,
) -> dict:
    """``{"top1", "top5", "k", "temperature", "n_train", "n_test", "index", ...}`` (accuracies in [0, 1])."""
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    kind = choose_index(len(train_x), int(np.shape(train_x)[1]), index, memory_mb)
    votes = knn_votes(train_x, train_y, test_x, num_classes=num_classes, k=k, temperature=temperature,
                      index=kind, nlist=nlist, nprobe=nprobe)
    acc = topk_accuracy(votes, test_y)
    out = {
        "top1": acc[1],
        "top5": acc[5],
        "k": min(int(k), len(train_x)),
        "temperature": float(temperature),
        "n_train": int(len(train_x)),
        "n_test": int(len(test_x)),
        "index": kind,
    }
    if kind == "ivf":
        lists = max(1, min(int(nlist or default_nlist(len(train_x))), len(train_x)))
        out.update(nlist=lists, nprobe=max(1, min(int(nprobe), lists)))
    return out
