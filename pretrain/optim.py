"""AdamW with BEiT's parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch

from pipeline.config import Range


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no decay on norms, biases, layer scale, position tables, mask and cls tokens."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


class WarmupCosine:
    """LR factor at step s (0-based): linear warmup to 1, then cosine down to ``min_lr / lr``.

    A plain object (not a closure) so that ``LambdaLR.state_dict`` saves its fields and a checkpoint
    loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, total_steps: int, warmup_steps: int, lr: float, min_lr: float):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.floor = float(min_lr) / float(lr) if lr > 0 else 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, cfg.lr, cfg.min_lr))


__all__ = ["OptimConfig", "WarmupCosine", "make_optimizer", "make_scheduler", "param_groups"]
