"""The training loop each Ray Train worker runs (one DDP rank), on ``pipeline.train_worker``.

Every rank builds the same model (same seed), restores the run's newest checkpoint if Ray Train has
one (a rerun of the same named run, or a restart after a worker failure), streams exactly
``end_step - start_step`` batches (``pretrain.data``), and steps AdamW with warmup + cosine and
gradient clipping; bf16 autocast on GPU, fp32 on CPU. Metrics are summed over ranks every
``log_every`` steps and at epoch ends (``pretrain.progress``); rank 0 writes ``metrics.jsonl`` and
prints a progress line. Epoch ends and checkpoint steps are reported to Ray Train (on every rank).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

from pipeline.config import dump_config
from pipeline.tensors import normalize
from pipeline.train_worker import WorkerEnv, derive_seed, report, restored, seed_everything, worker_env
from pretrain.checkpoint import checkpoint_state, load_checkpoint, optimizer_digest, save_checkpoint
from pretrain.data import SampleTransform, make_dataset, make_loader
from pretrain.model import build_model
from pretrain.optim import make_optimizer, make_scheduler
from pretrain.plan import RunPlan, load_tokenizer
from pretrain.progress import Progress


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: dict[str, torch.Tensor],
               device: torch.device, *, mean: torch.Tensor, std: torch.Tensor, tokenizer: Any = None,
               autocast=contextlib.nullcontext, clip: float | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
    """One optimizer step on one loader batch: normalise the uint8 images (``mean``/``std`` on ``device``),
    run the tokenizer on the batch (tokens-online), forward, backward, clip, AdamW, schedule.
    Returns the model's outputs, the gradient norm and the lr used."""
    # (the named ranges are what bench/bench_pretrain.py's step profile splits the step by)
    with record_function("step.input"):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        images = normalize(batch["image"], mean, std)
    with autocast():
        tokens = batch.get("tokens")
        if tokenizer is not None:
            with torch.no_grad(), record_function("step.tokenizer"):
                tokens = tokenizer.encode(batch["tok_image"].float().div_(255.0))  # [0, 1], as the interface asks
        with record_function("step.forward"):
            out = model(images, batch["mask"], tokens)
    optimizer.zero_grad(set_to_none=True)
    with record_function("step.backward"):
        out["loss"].backward()
    with record_function("step.optimizer"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return out, grad_norm, lr




def _loader(plan: RunPlan, env: WorkerEnv, start_step: int):
    """Exactly ``end_step - start_step`` batches for this rank (none when nothing is left: ``with_epoch(0)``
    would mean "no limit"); a resumed run draws fresh masks and order (salted by the step)."""
    cfg, remaining = plan.cfg, max(0, plan.end_step - start_step)
    if not remaining:
        return []
    transform = SampleTransform(
        img_size=cfg.data.img_size, masker=plan.masker, target=cfg.target, tok_input_size=plan.tok_input_size,
        augment=cfg.data.augment, style=cfg.data.view_style(), seed=cfg.seed, rank=env.rank, salt=start_step,
        vocab_size=plan.vocab_size if cfg.target == "tokens" else None,
    )
    dataset = make_dataset(plan.urls, transform, plan.per_worker_batch, shuffle_buffer=cfg.data.shuffle_buffer,
                           rank=env.rank, world=env.world, seed=derive_seed(cfg.seed, env.rank, start_step),
                           sha256=plan.shard_sha256 if cfg.data.verify_shards else None)
    return make_loader(dataset, remaining, workers=cfg.data.loader_workers, prefetch=cfg.data.prefetch, pin_memory=env.gpu)


def train_loop_per_worker(plan: RunPlan) -> dict[str, Any]:
    cfg = plan.cfg
    env = worker_env(cpus=cfg.cpus_per_worker, use_gpu=cfg.use_gpu)
    seed_everything(cfg.seed)
    core = build_model(cfg.model, cfg.data.img_size, cfg.target, plan.vocab_size)
    model = env.wrap(core)  # DDP when world > 1
    if cfg.compile:
        core.compile_blocks()  # in place, so DDP and checkpoints see the same module
    optimizer = make_optimizer(core, cfg.optim, fused=env.gpu)
    scheduler = make_scheduler(optimizer, cfg.optim, plan.total_steps, plan.warmup_steps)
    start_step, resumed_digest = 0, None
    with restored() as d:
        if d is not None:
            start_step = int(load_checkpoint(d, core, optimizer, scheduler, env.device)["step"])
            resumed_digest = optimizer_digest(optimizer.state_dict())
    tokenizer = load_tokenizer(cfg.data.tokenizer).to(env.device).eval() if cfg.target == "tokens-online" else None
    progress = Progress(plan, env, start_step, resumed_digest)
    mean = torch.tensor(cfg.data.mean, dtype=torch.float32, device=env.device)
    std = torch.tensor(cfg.data.std, dtype=torch.float32, device=env.device)
    config_yaml = dump_config(cfg)

    def write_checkpoint(directory: Path) -> None:
        state = checkpoint_state(core, step=step, total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                                 img_size=cfg.data.img_size, mean=cfg.data.mean, std=cfg.data.std, target=cfg.target,
                                 vocab_size=plan.vocab_size, tokenizer_id=plan.tokenizer_id, optimizer=optimizer)
        save_checkpoint(directory, core, optimizer, scheduler, state, config_yaml)

    step, run_start = start_step, time.perf_counter()
    model.train()
    for batch in _loader(plan, env, start_step):
        out, grad_norm, lr = train_step(model, optimizer, scheduler, batch, env.device, mean=mean, std=std,
                                        tokenizer=tokenizer, autocast=env.autocast, clip=cfg.optim.clip)
        step += 1
        progress.add(out, batch["image"].shape[0])
        epoch_end = step % plan.steps_per_epoch == 0
        do_ckpt = step % cfg.checkpoint_every == 0 or step == plan.end_step
        if step % cfg.log_every == 0 or step == plan.end_step or epoch_end:
            progress.step(step, lr, grad_norm)
        if epoch_end or do_ckpt:
            metrics = progress.epoch(step, lr) if epoch_end else progress.checkpoint_metrics(step)
            report(metrics, name=f"checkpoint_{step:08d}", write=write_checkpoint if do_ckpt else None)
        if do_ckpt:
            progress.flush()

    seconds = time.perf_counter() - run_start
    rank_steps = progress.close(step, step - start_step, seconds)
    return {
        "start_step": start_step, "step": step, "total_steps": plan.total_steps, "rank_steps": rank_steps,
        "resumed_optimizer_digest": resumed_digest, "train_seconds": round(seconds, 2),
        **{k: v for k, v in progress.last.items() if k in ("loss", "acc", "lr", "images_per_s")},
    }
