"""The benchmarks' own measuring code (the benchmarks themselves run by hand: `make bench`)."""

from __future__ import annotations

import torch

from bench.bench_pretrain import step_profile
from pretrain.loop import train_step
from pretrain.model import MIMModel, ModelConfig
from pretrain.optim import OptimConfig, make_optimizer, make_scheduler


def test_step_profile_splits_the_real_training_step_into_its_ranges():
    torch.manual_seed(0)
    model = MIMModel(ModelConfig(dim=32, depth=2, heads=2, patch=8, drop_path=0.0), 32, "tokens", 64)
    opt = make_optimizer(model, OptimConfig(lr=1e-3))
    sched = make_scheduler(opt, OptimConfig(lr=1e-3), 100, 0)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :6] = True
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
             "mask": mask, "tokens": torch.randint(0, 64, (4, 4, 4), generator=g)}
    mean = std = torch.full((3,), 0.5)
    steps = 3

    def run():
        for _ in range(steps):
            train_step(model, opt, sched, batch, torch.device("cpu"), mean=mean, std=std, clip=3.0)

    p = step_profile(run, steps, torch.device("cpu"), top=5)
    phases = p["phases_host_ms"]
    assert set(phases) == {"input", "forward", "backward", "optimizer"}  # no tokenizer: cached targets
    assert all(v > 0 for v in phases.values())
    assert p["top_ops_time"] == "host" and len(p["top_ops"]) == 5
    ms = [o["ms"] for o in p["top_ops"]]
    assert ms == sorted(ms, reverse=True) and 0 < sum(o["share"] for o in p["top_ops"]) <= 1.0
    assert not any(o["op"].startswith("step.") for o in p["top_ops"])
