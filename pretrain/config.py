"""The pretraining stage's config: one typed dataclass, loaded from ``pretrain/recipes/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pipeline.config import PATH, Range
from pretrain.data import DataConfig
from pretrain.model import ModelConfig
from pretrain.optim import OptimConfig


@dataclass
class MaskConfig:
    mode: Literal["block", "random"] = "block"
    ratio: Annotated[float, Range(gt=0, lt=1)] = 0.4  # fraction of patches masked ...
    num_masked: Annotated[int | None, Range(ge=1)] = None  # ... or exactly this many (BEiT base: 75 of 196)
    min_block: Annotated[int, Range(ge=1)] = 16  # blockwise: smallest block, in patches
    max_block: Annotated[int | None, Range(ge=1)] = None  # blockwise: largest block (default: the whole budget)
    min_aspect: Annotated[float, Range(gt=0, le=1)] = 0.3  # blockwise: aspect ratio log-uniform in [min_aspect, 1/min_aspect]


@dataclass
class PretrainConfig:
    RECIPES: ClassVar[Path] = Path(__file__).parent / "recipes"

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    target: Literal["tokens", "tokens-online", "pixels"] = "tokens"
    epochs: Annotated[float, Range(gt=0)] = 1.0  # passes over the cache (an epoch = cache samples // data.batch_size steps) ...
    steps: Annotated[int | None, Range(ge=1)] = None  # ... or exactly this many optimizer steps
    stop_at: Annotated[int | None, Range(ge=1)] = None  # stop (with a checkpoint) after this step; a rerun continues the schedule
    workers: Annotated[int, Range(ge=1)] = 1  # Ray Train workers (DDP ranks)
    cpus_per_worker: Annotated[int, Range(ge=1)] = 1  # CPUs reserved per worker; also its torch threads
    use_gpu: bool = False  # one GPU per worker, NCCL and bf16 autocast; CPU: gloo and fp32
    compile: bool = False  # torch.compile each transformer block (pays off on GPU; a minute of start-up)
    checkpoint_every: Annotated[int, Range(ge=1)] = 1000  # steps (and always at the last step)
    keep_checkpoints: Annotated[int | None, Range(ge=1)] = 2
    run_name: str = "pretrain"
    out: Annotated[str, PATH] = "runs/pretrain"  # storage path (local or URI, shared by all nodes on a cluster)
    max_failures: Annotated[int, Range(ge=-1)] = 3  # killed workers replaced inside the run, each time from the newest checkpoint
    seed: int = 0
    log_every: Annotated[int, Range(ge=1)] = 20  # steps between progress lines / metrics records

    def validate(self) -> None:
        if self.data.img_size % self.model.patch:
            raise ValueError(f"data.img_size ({self.data.img_size}) must be a multiple of model.patch ({self.model.patch})")
        if self.data.batch_size % self.workers:
            raise ValueError(f"data.batch_size ({self.data.batch_size}) must split evenly over workers ({self.workers})")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name: must be a non-empty name without '/', got {self.run_name!r}")
