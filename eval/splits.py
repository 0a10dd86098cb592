"""Where the test set comes from, and how test labels map onto the training classes.

Splits, in order of preference: ``test_source`` when given; the source's own split (``split=test``
for ``shapes`` and IDX folders, ``val/`` or ``test/`` beside ``train/`` for image folders); otherwise
a deterministic split of the one source by a hash of each sample's key (``test_fraction``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from eval.eval_config import EvalError
from pipeline import storage
from pipeline.sources import split_spec, with_params


@dataclass(frozen=True)
class SplitPlan:
    train: str
    test: str
    mode: Literal["given", "source", "hash"]
    test_fraction: float = 0.0

    def masks(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """Hash mode: (train mask, test mask) over ``keys``; None otherwise."""
        if self.mode != "hash":
            return None
        test = np.array([is_test_key(k, self.test_fraction) for k in keys], dtype=bool)
        return ~test, test


def is_test_key(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"eval-split:{key}".encode()).digest()[:8], "big")
    return h / 2.0**64 < fraction


def resolve_split(train_spec: str, test_spec: str | None, test_fraction: float = 0.2) -> SplitPlan:
    """Where the test set comes from; refuses unlabelled sources (``EvalError``)."""
    from eval.features import open_labelled

    train = open_labelled(train_spec)
    if test_spec:
        open_labelled(test_spec)
        return SplitPlan(train_spec, test_spec, "given")
    params = split_spec(train_spec)[1]
    candidates: list[tuple[str, str]] = []
    if train.kind in ("shapes", "idx") and params.get("split", "train") == "train":
        candidates = [(with_params(train_spec, split="train"), with_params(train_spec, split="test"))]
    elif train.kind == "folder" and "split" not in params:
        if storage.is_dir(storage.join(train.root, "train")):
            candidates = [
                (with_params(train_spec, split="train"), with_params(train_spec, split=name))
                for name in ("val", "test")
                if storage.is_dir(storage.join(train.root, name))
            ]
    for tr, te in candidates:
        try:
            a, b = open_labelled(tr), open_labelled(te)
        except Exception:  # noqa: BLE001 - a candidate that does not open is just not a split
            continue
        if a.fingerprint() != b.fingerprint():
            return SplitPlan(tr, te, "source")
    return SplitPlan(train_spec, train_spec, "hash", test_fraction)


def class_mapping(train_classes: list[str], test_classes: list[str], test_spec: str) -> np.ndarray | None:
    """Test label -> train label by class name; None when identical. Unknown test classes are an error."""
    if list(test_classes) == list(train_classes):
        return None
    unknown = [c for c in test_classes if c not in train_classes]
    if unknown:
        raise EvalError(
            f"test source {test_spec!r} has classes the training source lacks: {unknown[:5]}"
            f" (training classes: {list(train_classes)[:10]})"
        )
    return np.array([train_classes.index(c) for c in test_classes], dtype=np.int64)
