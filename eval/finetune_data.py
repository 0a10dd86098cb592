"""What fine-tuning trains on, selects on and is tested on, as key lists: the driver holds no images.

Labels are listed by Ray tasks over the source's partitions (items read, never decoded, the bytes
dropped at once), so the driver only holds ``(key, label)`` pairs. From them, deterministically and
independently of the source's order (all by ``sha256`` of the key):

* the *labelled subset*: ``label_fraction`` of each class (at least one), ``class_balanced_subset``;
* the *validation split*: ``val_fraction`` of each class of that subset (at least one where the class
  has two or more), ``validation_split``; the checkpoint is selected on it, never on the test set.
  It comes out of the labelled subset, so a 1%-label run uses 1% of the labels in all;
* the *test keys*: every labelled item of the test source, or, when train and test are one source
  cut by key hash (``eval.splits``), the test side of that cut.

The workers then stream exactly these keys (``eval.stream.LabelledStream(keys=...)``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from eval.eval_config import EvalError, FinetuneConfig
from eval.splits import SplitPlan, class_mapping, is_test_key


def _rank(seed: int, key: str, salt: str = "") -> bytes:
    return hashlib.sha256(f"{salt}{seed}:{key}".encode()).digest()


def class_balanced_subset(labels: np.ndarray, keys: list[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices: from each class, the ``round(fraction * n_c)`` (at least 1) samples whose
    ``sha256(seed:key)`` sort first. Deterministic, and independent of the source's order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    chosen: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ranked = sorted(members, key=lambda i: _rank(seed, keys[i]))
        chosen.extend(ranked[: max(1, int(round(fraction * len(members))))])
    return np.asarray(sorted(chosen), dtype=np.int64)


def validation_split(labels: np.ndarray, keys: list[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the validation items: from each class with two or more members,
    ``round(fraction * n_c)`` clamped to [1, n_c - 1] by ``sha256("val", seed, key)`` order (a salt
    unlike the subset's, so the two picks are independent); none when ``fraction`` is 0."""
    labels = np.asarray(labels)
    val = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return val
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue  # a class's only example trains; it cannot also be held out
        n = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        ranked = sorted(members, key=lambda i: _rank(seed, keys[i], "val:"))
        val[ranked[:n]] = True
    return val


def _partition_labels(spec: str, index: int) -> tuple[list[str], list[int], int]:
    """(keys, labels, unusable count) of one partition: items read, not decoded."""
    from eval.features import open_labelled
    from pipeline.sources import Sample

    source = open_labelled(spec)
    keys: list[str] = []
    labels: list[int] = []
    bad = 0
    for item in source.iter_partition(source.partitions()[index]):
        if isinstance(item, Sample) and item.label is not None:
            keys.append(item.key)
            labels.append(int(item.label))
        else:
            bad += 1
    return keys, labels, bad


def label_index(spec: str) -> tuple[list[str], np.ndarray, list[str], int]:
    """(keys sorted, their labels, class names, unusable items) of a labelled source; Ray tasks over
    its partitions when Ray is up, else in this process."""
    import ray

    from eval.features import open_labelled

    source = open_labelled(spec)
    count = len(source.partitions())
    if ray.is_initialized():
        task = ray.remote(num_cpus=1)(_partition_labels)
        parts = ray.get([task.remote(spec, i) for i in range(count)])
    else:
        parts = [_partition_labels(spec, i) for i in range(count)]
    pairs = sorted((k, y) for keys, labels, _ in parts for k, y in zip(keys, labels))
    if not pairs:
        raise EvalError(f"source {spec!r} has no labelled items to fine-tune on")
    return ([k for k, _ in pairs], np.asarray([y for _, y in pairs], dtype=np.int64), list(source.classes or []),
            sum(bad for *_, bad in parts))


@dataclass
class FinetuneData:
    """Keys (and labels) of the three sets; specs to stream them from."""

    train_spec: str
    train_keys: list[str]
    train_labels: np.ndarray
    val_keys: list[str]
    val_labels: np.ndarray
    test_spec: str
    test_keys: list[str]
    test_mapping: list[int] | None  # test label -> train label when the class lists differ
    classes: list[str]
    n_available: int  # labelled training items before the label fraction
    skipped: dict[str, int]

    @property
    def selected_on(self) -> str:
        return "validation" if self.val_keys else "last"


def plan_finetune(plan: SplitPlan, cfg: FinetuneConfig, seed: int) -> FinetuneData:
    """The train / validation / test keys for ``cfg`` (label fraction, validation fraction) and the split."""
    keys, labels, classes, bad = label_index(plan.train)
    test_bad = 0
    if plan.mode == "hash":
        is_test = np.array([is_test_key(k, plan.test_fraction) for k in keys], dtype=bool)
        test_keys = [k for k, t in zip(keys, is_test) if t]
        keys, labels = [k for k, t in zip(keys, is_test) if not t], labels[~is_test]
        test_classes = classes
    else:
        test_keys, _, test_classes, test_bad = label_index(plan.test)
    if not keys or not test_keys:
        raise EvalError(f"fine-tuning needs labelled train and test items: {len(keys)} train in {plan.train!r}, "
                        f"{len(test_keys)} test in {plan.test!r}")
    mapping = class_mapping(classes, test_classes, plan.test)
    subset = class_balanced_subset(labels, keys, cfg.label_fraction, seed)
    sub_keys, sub_labels = [keys[i] for i in subset], labels[subset]
    val = validation_split(sub_labels, sub_keys, cfg.val_fraction, seed)
    return FinetuneData(
        train_spec=plan.train, train_keys=[k for k, v in zip(sub_keys, val) if not v], train_labels=sub_labels[~val],
        val_keys=[k for k, v in zip(sub_keys, val) if v], val_labels=sub_labels[val],
        test_spec=plan.test, test_keys=test_keys,
        test_mapping=None if mapping is None else [int(v) for v in mapping], classes=classes,
        n_available=len(keys), skipped={"train": bad, "test": test_bad},
    )
