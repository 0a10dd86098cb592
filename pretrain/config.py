"""The pretraining stage's config: one typed dataclass, loaded from ``pretrain/recipes/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pretrain.data import DataConfig
from pretrain.model import ModelConfig
from pretrain.optim import OptimConfig


@dataclass
class MaskConfig:
    mode: Literal["block", "random"] = "block"
    ratio: float = 0.4  # fraction of patches masked ...
    num_masked: int | None = None  # ... or exactly this many (BEiT base: 75 of 196)
    min_block: int = 16  # blockwise: smallest block, in patches
    max_block: int | None = None  # blockwise: largest block (default: the whole budget)
    min_aspect: float = 0.3  # blockwise: aspect ratio log-uniform in [min_aspect, 1/min_aspect]


@dataclass
class PretrainConfig:
    RECIPES: ClassVar[Path] = Path(__file__).parent / "recipes"

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    target: Literal["tokens", "tokens-online", "pixels"] = "tokens"
    epochs: float = 1.0  # passes over the cache (an epoch = cache samples // data.batch_size steps) ...
    steps: int | None = None  # ... or exactly this many optimizer steps
    stop_at: int | None = None  # stop (with a checkpoint) after this step; a rerun continues the schedule
    workers: int = 1  # Ray Train workers (DDP ranks)
    cpus_per_worker: int = 1  # CPUs reserved per worker; also its torch threads
    use_gpu: bool = False  # one GPU per worker, NCCL and bf16 autocast; CPU: gloo and fp32
    compile: bool = False  # torch.compile each transformer block (pays off on GPU; a minute of start-up)
    checkpoint_every: int = 1000  # steps (and always at the last step)
    keep_checkpoints: int | None = 2
    run_name: str = "pretrain"
    out: str = "runs/pretrain"  # storage path (local or URI, shared by all nodes on a cluster)
    max_failures: int = 3  # killed workers replaced inside the run, each time from the newest checkpoint
    seed: int = 0
    log_every: int = 20  # steps between progress lines / metrics records
