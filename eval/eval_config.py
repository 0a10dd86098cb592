"""``mimflow eval``'s config (``EvalConfig`` with its ``probe`` and ``finetune`` sections) and ``EvalError``.

Importing this module loads neither torch nor Ray: the config dataclasses can live in other stages'
configs and in ``mimflow --help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pipeline.config import PATH, SOURCE, Range
from pipeline.errors import StageError

METHODS = ("knn", "linear", "finetune")


@dataclass
class ProbeConfig:
    optimizer: Literal["lbfgs", "adamw"] = "lbfgs"
    epochs: Annotated[int, Range(ge=1)] = 300  # L-BFGS iterations (full batch) or AdamW epochs
    lr: Annotated[float | None, Range(gt=0)] = None  # default: 1.0 for L-BFGS, 1e-2 for AdamW
    weight_decays: Annotated[list[float], Range(ge=0)] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])  # chosen on held-out train
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.2
    batch_size: Annotated[int, Range(ge=1)] = 256  # AdamW only


@dataclass
class FinetuneConfig:
    epochs: Annotated[int, Range(ge=1)] = 5  # passes over the labelled training subset (see min_steps/steps)
    steps: Annotated[int | None, Range(ge=1)] = None  # the step budget; overrides epochs when set
    min_steps: Annotated[int, Range(ge=0)] = 0  # at least this many optimizer steps: few labels still train to convergence
    lr: Annotated[float, Range(gt=0)] = 1e-3  # peak lr of the head; block i gets lr * layer_decay^(depth - i)
    min_lr: Annotated[float, Range(ge=0)] = 1e-6
    layer_decay: Annotated[float, Range(gt=0, le=1)] = 0.65
    drop_path: Annotated[float, Range(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[float, Range(ge=0)] = 0.05
    batch_size: Annotated[int, Range(ge=1)] = 64  # per worker
    workers: Annotated[int, Range(ge=0)] = 1  # Ray Train workers; 0 runs in the driver process
    cpus_per_worker: Annotated[int, Range(ge=1)] = 1
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    label_fraction: Annotated[float, Range(gt=0, le=1)] = 1.0  # e.g. 0.01, 0.1: a deterministic class-balanced subset of train
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.1  # of the labelled subset, held out to select the checkpoint; 0: report the last
    warmup_epochs: Annotated[float, Range(ge=0)] = 1.0
    warmup_steps: Annotated[int | None, Range(ge=0)] = None  # overrides warmup_epochs when set
    evals: Annotated[int, Range(ge=1)] = 20  # at most this many validation points (and checkpoints); at least one per epoch otherwise
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.1
    clip_grad: Annotated[float | None, Range(gt=0)] = None
    augment: bool = True  # random-resized crop + flip
    keep_model: bool = True  # the final checkpoint holds the selected fine-tuned classifier (timm Beit + head)
    max_failures: int = 3  # killed workers replaced inside the run, each time from the newest checkpoint


@dataclass
class EvalConfig:
    RECIPES: ClassVar[Path] = Path(__file__).parent / "recipes"

    encoder: Annotated[str, PATH] = ""  # exported encoder dir (or a pretraining checkpoint dir)
    train_source: Annotated[str, SOURCE] = ""  # labelled source spec
    test_source: Annotated[str | None, SOURCE] = None  # default: the source's own test split, else a hash split
    test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.2  # for the hash split only
    methods: list[Literal["knn", "linear", "finetune"]] = field(default_factory=lambda: ["knn", "linear"])
    pooling: Literal["cls", "mean"] = "mean"
    layer: int | None = None  # block index for features (negative from the end); None: last, normed
    batch_size: Annotated[int, Range(ge=1)] = 128  # feature extraction
    feature_workers: Annotated[int | None, Range(ge=0)] = None  # Ray actors over source partitions (None: one per CPU, or per GPU); 0: in this process
    progress_every: Annotated[int, Range(ge=1)] = 10  # a progress line (rate, ETA) every this many partitions
    k: Annotated[int, Range(ge=1)] = 20
    temperature: Annotated[float, Range(gt=0)] = 0.07
    knn_index: Literal["auto", "flat", "ivf"] = "auto"  # auto: flat while the train features fit knn_memory_mb
    knn_memory_mb: Annotated[float, Range(gt=0)] = 4096.0  # budget for an exact (flat, float32) index of the train features
    knn_nlist: Annotated[int | None, Range(ge=1)] = None  # IVF lists (None: about 4 sqrt(N))
    knn_nprobe: Annotated[int, Range(ge=1)] = 32  # IVF lists searched per query
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: Literal["random", "none"] = "none"
    out: Annotated[str, PATH] = "eval-out"
    feature_cache: Annotated[str | None, PATH] = None  # default: <out>/feature-cache
    seed: int = 0

    def validate(self) -> None:
        if not self.methods:
            raise ValueError("methods: must name at least one of knn, linear, finetune")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: has duplicates: {self.methods}")


class EvalError(StageError):
    """An evaluation input a user can fix: unlabelled data, mismatched classes, missing encoder."""
