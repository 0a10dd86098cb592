"""Pretraining's AdamW and schedule: the harness's parameter groups (``pipeline.train_worker.param_groups``:
no decay on norms, biases, layer scale, position tables, mask and cls tokens) and its warmup + cosine
(``WarmupCosine``) as a ``LambdaLR``, whose state checkpoints keep in ``scheduler.pt``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from pipeline.config import Range
from pipeline.train_worker import WarmupCosine, param_groups


@dataclass
class OptimConfig:
    lr: Annotated[float, Range(gt=0)] = 1.5e-3  # peak learning rate (absolute, for data.batch_size)
    min_lr: Annotated[float, Range(ge=0)] = 1e-5  # end of the cosine
    weight_decay: Annotated[float, Range(ge=0)] = 0.05
    betas: Annotated[list[float], Range(ge=0, lt=1)] = field(default_factory=lambda: [0.9, 0.999])
    eps: Annotated[float, Range(gt=0)] = 1e-8
    warmup_steps: Annotated[int, Range(ge=0)] = 0  # linear warmup; when 0, warmup_epochs decides
    warmup_epochs: Annotated[float, Range(ge=0)] = 0.0
    clip: Annotated[float | None, Range(gt=0)] = 3.0  # max global gradient norm; null disables clipping

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ValueError(f"betas: must be 2 values, got {self.betas}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, cfg.lr, cfg.min_lr))


__all__ = ["OptimConfig", "WarmupCosine", "make_optimizer", "make_scheduler", "param_groups"]
