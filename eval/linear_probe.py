"""Linear probe: a linear classifier on frozen, standardised features, trained to convergence.

Features are standardised with the training set's per-dimension mean and std (what a BatchNorm
without affine parameters does over the full batch). The classifier is fit by full-batch L-BFGS on
cross-entropy + L2 (deterministic and converged within a few hundred iterations at these sizes) or
by AdamW with a cosine schedule. When several weight decays are given, each is fit on 80% of the
training set and scored on the held-out 20%; the best is refit on the whole training set. The test
set is never used for that choice.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)
SMALL_PROBLEM = 1 << 22  # feature-matrix elements below which the probe runs single-threaded


def standardise(train_x: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[torch.Tensor]:
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True)
    return [(t - mean) / (std + eps) for t in (x, *(torch.as_tensor(np.asarray(o, dtype=np.float32)) for o in others))]


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-3,
    optimizer: str = "lbfgs",
    epochs: int = 300,
    lr: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[torch.nn.Linear, dict]:
    """Fit ``Linear(D, C)`` on standardised ``x``; returns it and {iterations, converged, loss}."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=gen)
        layer.bias.zero_()
    y = y.long()
    info: dict = {}
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            layer.parameters(), lr=lr or 1.0, max_iter=epochs, history_size=20,
            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        n_iter = int(opt.state[opt._params[0]].get("n_iter", epochs))
        info = {"iterations": n_iter, "converged": n_iter < epochs}
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(layer.parameters(), lr=lr or 1e-2, weight_decay=weight_decay)
        steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
        total = epochs * steps_per_epoch
        step = 0
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(steps_per_epoch):
                idx = perm[s * batch_size : (s + 1) * batch_size]
                for g in opt.param_groups:
                    g["lr"] = (lr or 1e-2) * 0.5 * (1 + math.cos(math.pi * step / total))
                opt.zero_grad()
                F.cross_entropy(layer(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
        info = {"iterations": total, "converged": None}
    else:
        raise ValueError(f"optimizer must be lbfgs or adamw, got {optimizer!r}")
    with torch.no_grad():
        info["loss"] = float(F.cross_entropy(layer(x), y))
    return layer, info


@torch.no_grad()
def accuracy(layer: torch.nn.Linear, x: torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    return float((layer(x).argmax(1) == torch.as_tensor(y).long()).float().mean())


@contextmanager
def _threads_for(elements: int):
    """One thread for small problems: on a busy CPU, OpenMP barriers around tiny ops cost 10-40x."""
    before = torch.get_num_threads()
    if elements < SMALL_PROBLEM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    optimizer: str = "lbfgs",
    epochs: int = 300,
    lr: float | None = None,
    weight_decays: tuple[float, ...] | list[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """``{"top1", "train_top1", "weight_decay", "val_top1": {wd: acc}, "selected_on", "n_val", "iterations", ...}``;
    ``selected_on`` is "validation" (a held-out part of the training set) or "fixed" (one weight decay)."""
    with _threads_for(int(np.size(train_x))):
        return _linear_probe(
            train_x, train_y, test_x, test_y, num_classes=num_classes, optimizer=optimizer, epochs=epochs, lr=lr,
            weight_decays=weight_decays, val_fraction=val_fraction, batch_size=batch_size, seed=seed,
        )


def _linear_probe(train_x, train_y, test_x, test_y, *, num_classes, optimizer, epochs, lr, weight_decays,
                  val_fraction, batch_size, seed) -> dict:
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    num_classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    weight_decays = [float(w) for w in weight_decays] or [1e-3]
    opts = dict(optimizer=optimizer, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)

    val_scores: dict[str, float] = {}
    chosen = weight_decays[0]
    n_val = 0
    if len(weight_decays) > 1 and len(train_x) >= 10:
        perm = np.random.default_rng(seed).permutation(len(train_x))
        n_val = max(1, int(round(val_fraction * len(train_x))))  # of the training features: never the test set
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        fx, vx = standardise(train_x[fit_idx], train_x[val_idx])
        fy = torch.as_tensor(train_y[fit_idx])
        best = -1.0
        for wd in sorted(weight_decays, reverse=True):  # ties go to the stronger regulariser
            layer, _ = fit_linear(fx, fy, num_classes, weight_decay=wd, **opts)
            acc = accuracy(layer, vx, train_y[val_idx])
            val_scores[f"{wd:g}"] = acc
            if acc > best:
                best, chosen = acc, wd

    x, tx = standardise(train_x, test_x)
    layer, info = fit_linear(x, torch.as_tensor(train_y), num_classes, weight_decay=chosen, **opts)
    return {
        "top1": accuracy(layer, tx, test_y),
        "train_top1": accuracy(layer, x, train_y),
        "weight_decay": chosen,
        "val_top1": val_scores,
        "selected_on": "validation" if val_scores else "fixed",  # the weight decay's choice
        "n_val": n_val,
        "optimizer": optimizer,
        "n_train": int(len(train_x)),
        "n_test": int(len(test_x)),
        **info,
    }
