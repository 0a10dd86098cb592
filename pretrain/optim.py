"""Pretraining's AdamW and schedule: the harness's parameter groups (``pipeline.train_worker.param_groups``:
no decay on norms, biases, layer scale, position tables, mask and cls tokens) and its warmup + cosine
(``WarmupCosine``) as a ``LambdaLR``, whose state checkpoints keep in ``scheduler.pt``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.train_worker import WarmupCosine, param_groups


@dataclass
class OptimConfig:
    lr: float = 1.5e-3  # peak learning rate (absolute, for data.batch_size)
    min_lr: float = 1e-5  # end of the cosine
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup; when 0, warmup_epochs decides
    warmup_epochs: float = 0.0
    clip: float | None = 3.0  # max global gradient norm; null disables clipping


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, cfg.lr, cfg.min_lr))


__all__ = ["OptimConfig", "WarmupCosine", "make_optimizer", "make_scheduler", "param_groups"]
