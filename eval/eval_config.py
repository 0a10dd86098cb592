"""``mimflow eval``'s config (``EvalConfig`` with its ``probe`` and ``finetune`` sections) and ``EvalError``.

Importing this module loads neither torch nor Ray: the config dataclasses can live in other stages'
configs and in ``mimflow --help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.errors import StageError

METHODS = ("knn", "linear", "finetune")


@dataclass
class ProbeConfig:
    optimizer: Literal["lbfgs", "adamw"] = "lbfgs"
    epochs: int = 300  # L-BFGS iterations (full batch) or AdamW epochs
    lr: float | None = None  # default: 1.0 for L-BFGS, 1e-2 for AdamW
    weight_decays: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])  # chosen on held-out train
    val_fraction: float = 0.2
    batch_size: int = 256  # AdamW only


@dataclass
class FinetuneConfig:
    epochs: int = 5
    lr: float = 1e-3  # peak lr of the head; block i gets lr * layer_decay^(depth - i)
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    drop_path: float = 0.1
    weight_decay: float = 0.05
    batch_size: int = 64  # per worker
    workers: int = 1  # Ray Train workers; 0 runs in the driver process
    cpus_per_worker: int = 1
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    label_fraction: float = 1.0  # e.g. 0.01, 0.1: a deterministic class-balanced subset of train
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    augment: bool = True  # random-resized crop + flip
    keep_model: bool = True  # the final checkpoint holds the fine-tuned classifier (timm Beit + head)

    def __post_init__(self):
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"finetune.label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.epochs < 1:
            raise ValueError(f"finetune.epochs must be >= 1, got {self.epochs}")


@dataclass
class EvalConfig:
    RECIPES: ClassVar[Path] = Path(__file__).parent / "recipes"

    encoder: str = ""  # exported encoder dir (or a pretraining checkpoint dir)
    train_source: str = ""  # labelled source spec
    test_source: str | None = None  # default: the source's own test split, else a hash split
    test_fraction: float = 0.2  # for the hash split only
    methods: list[Literal["knn", "linear", "finetune"]] = field(default_factory=lambda: ["knn", "linear"])
    pooling: Literal["cls", "mean"] = "mean"
    layer: int | None = None  # block index for features (negative from the end); None: last, normed
    batch_size: int = 128  # feature extraction
    feature_workers: int | None = None  # Ray actors over source partitions (None: one per CPU, or per GPU); 0: in this process
    progress_every: int = 10  # a progress line (rate, ETA) every this many partitions
    k: int = 20
    temperature: float = 0.07
    knn_index: Literal["auto", "flat", "ivf"] = "auto"  # auto: flat while the train features fit knn_memory_mb
    knn_memory_mb: float = 4096.0  # budget for an exact (flat, float32) index of the train features
    knn_nlist: int | None = None  # IVF lists (None: about 4 sqrt(N))
    knn_nprobe: int = 32  # IVF lists searched per query
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: Literal["random", "none"] = "none"
    out: str = "eval-out"
    feature_cache: str | None = None  # default: <out>/feature-cache
    seed: int = 0

    def __post_init__(self):
        if not self.methods:
            raise ValueError("methods must name at least one of knn, linear, finetune")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods has duplicates: {self.methods}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.k < 1 or self.temperature <= 0:
            raise ValueError("k must be >= 1 and temperature > 0")


class EvalError(StageError):
    """An evaluation input a user can fix: unlabelled data, mismatched classes, missing encoder."""
