"""The tokenizer's training config, its fingerprint, and the plan of which items train and which are held out.

Both the driver (``tokenizer.train``) and the workers (``tokenizer.train_loop``) read these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pipeline.config import PATH, SOURCE, Range, to_dict
from tokenizer.base import TokenizerConfig

# Execution-only fields: changing them does not change what is trained.
_EXECUTION_FIELDS = (
    "out", "storage_path", "run_name", "num_workers", "cpus_per_worker", "use_gpu",
    "loader_workers", "checkpoint_every", "max_failures",
)


@dataclass
class TokenizerTrainConfig:
    RECIPES: ClassVar[Path] = Path(__file__).parent / "recipes"

    source: Annotated[str, SOURCE] = "shapes?n=2000&size=64&split=train"
    out: Annotated[str, PATH] = "out/tokenizer"
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    # teacher (VQ-KD): "hog" or "timm:<model_name>" with a local safetensors file
    teacher: str = "hog"
    teacher_weights: Annotated[str | None, PATH] = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    hog_bins: Annotated[int, Range(ge=1)] = 9
    hog_cell: Annotated[int | None, Range(ge=1)] = None  # default: half the patch size
    hog_gray: bool = True  # histograms of luminance gradients (False: per RGB channel, 3x the dim)
    hog_floor: Annotated[float, Range(ge=0)] = 0.1  # cells are divided by max(l2 norm, floor): flat cells stay near zero
    standardize_targets: bool = True  # per-dimension standardisation of teacher features per batch
    # optimisation
    epochs: Annotated[int, Range(ge=1)] = 10
    batch_size: Annotated[int, Range(ge=1)] = 64  # global: split evenly across workers
    lr: Annotated[float, Range(gt=0)] = 1e-3
    min_lr: Annotated[float, Range(ge=0)] = 1e-5
    weight_decay: Annotated[float, Range(ge=0)] = 0.05
    warmup_epochs: Annotated[float, Range(ge=0)] = 1.0
    betas: Annotated[tuple[float, float], Range(ge=0, lt=1)] = (0.9, 0.99)
    grad_clip: Annotated[float, Range(ge=0)] = 1.0  # 0 = off
    amp: bool = True  # bf16 autocast on GPU (never on CPU: it is slower there)
    # data
    augment: bool = True  # random-resized crops + flips; else the centre view
    crop_scale: Annotated[tuple[float, float], Range(gt=0, le=1)] = (0.5, 1.0)
    cache_images: bool = True  # keep decoded images in memory (small sources)
    loader_workers: Annotated[int, Range(ge=0)] = 0  # DataLoader processes per Ray worker
    heldout_source: Annotated[str | None, SOURCE] = None
    heldout_size: Annotated[int, Range(ge=1)] = 256
    # VQ-KD codebook
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.99
    # Share of training before the codebook exists: the decoder reads the encoder's continuous outputs,
    # then the codebook is k-means-initialised on what the encoder has learnt. Quantising a random
    # encoder from step 0 left the demo's tokens near-useless (codes of colour, not of form).
    codebook_warmup: Annotated[float, Range(ge=0, lt=1)] = 0.0
    commitment_weight: Annotated[float, Range(ge=0)] = 1.0
    kmeans_iters: Annotated[int, Range(ge=0)] = 10
    restart_every: Annotated[int, Range(ge=0)] = 20  # steps between dead-code restarts (0 = never)
    # dVAE
    temperature_start: Annotated[float, Range(gt=0)] = 1.0
    temperature_end: Annotated[float, Range(gt=0)] = 0.0625
    temperature_anneal: Annotated[float, Range(ge=0, le=1)] = 0.8  # fraction of training over which the temperature decays
    kl_weight: Annotated[float, Range(ge=0)] = 0.0
    gumbel_hard: bool = False  # straight-through: one-hot samples forward, relaxed gradients backward
    # execution
    num_workers: Annotated[int, Range(ge=0)] = 1  # Ray Train workers (0 = in the driver process, nothing persisted)
    cpus_per_worker: Annotated[float, Range(gt=0)] = 1.0
    use_gpu: bool = False
    seed: int = 0
    run_name: str | None = None  # default: tokenizer-<kind>-<fingerprint>
    storage_path: Annotated[str | None, PATH] = None  # Ray Train storage; default: <parent of out>/ray
    checkpoint_every: Annotated[int, Range(ge=1)] = 1  # epochs (the last epoch is always checkpointed)
    max_failures: Annotated[int, Range(ge=-1)] = 3  # killed workers replaced inside the run, each time from the newest checkpoint

    def validate(self) -> None:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale: must be [lo, hi] with lo <= hi, got {list(self.crop_scale)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")


# --- planning (driver side) ---------------------------------------------------------------------
def teacher_for(cfg: TokenizerTrainConfig):
    """The VQ-KD teacher this config names (raises ConfigError on a bad spec or weights file)."""
    from tokenizer.teachers import build_teacher

    return build_teacher(
        cfg.teacher, grid=cfg.model.grid, input_size=cfg.model.input_size, weights=cfg.teacher_weights,
        kwargs=cfg.teacher_kwargs, hog_bins=cfg.hog_bins, hog_cell=cfg.hog_cell, hog_gray=cfg.hog_gray,
        hog_floor=cfg.hog_floor,
    )


def training_fingerprint(cfg: TokenizerTrainConfig, source_fingerprint: str) -> str:
    d = to_dict(cfg)
    for name in _EXECUTION_FIELDS:
        d.pop(name, None)
    doc = json.dumps({"config": d, "source": source_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


@dataclass
class Plan:
    train_start: int
    train_stop: int
    heldout_spec: str
    heldout_start: int
    heldout_stop: int
    heldout_desc: str


def make_plan(cfg: TokenizerTrainConfig, source) -> Plan:
    """Held-out images: ``heldout_source`` if set; for ``shapes`` the ``test`` split; otherwise the last
    ``heldout_size`` items of the source (at most a fifth of it), which are then left out of training."""
    from pipeline.sources import open_source, with_params

    n = len(source)
    if cfg.heldout_source:
        held = open_source(cfg.heldout_source)
        k = min(cfg.heldout_size, len(held))
        return Plan(0, n, cfg.heldout_source, 0, k, f"{k} images of {cfg.heldout_source!r}")
    if source.kind == "shapes":
        split = "heldout" if getattr(source, "split", "train") == "test" else "test"
        spec = with_params(source.spec, split=split, n=cfg.heldout_size)
        return Plan(0, n, spec, 0, cfg.heldout_size, f"{cfg.heldout_size} images of the shapes {split!r} split")
    k = min(cfg.heldout_size, n // 5)
    if k == 0:
        k = min(cfg.heldout_size, n)
        return Plan(0, n, source.spec, 0, k, f"{k} training images (source too small to hold any out)")
    return Plan(0, n - k, source.spec, n - k, n, f"the last {k} items of the source (not trained on)")

