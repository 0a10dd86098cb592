"""The training loop each Ray Train worker runs (one DDP rank), on ``pipeline.train_worker``.

Each rank reads an equal-sized, disjoint slice of the source's training items (by index), so every
rank runs the same number of steps; undecodable items are counted and dropped from their batch, never
a crash. AdamW, linear warmup then cosine decay, per-epoch loss and codebook usage over the whole
epoch (codes used, perplexity, all-reduced over ranks). A checkpoint (itself a loadable tokenizer
directory plus ``state.pt``) is reported at epoch ends; a rerun of the same named run, or a restart after
a worker failure, resumes from the newest. Rank 0 returns the summary the driver saves.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.train_worker import (WorkerEnv, apply_lr, derive_seed, load_torch, param_groups, report, restored,
                                   save_torch, seed_everything, warmup_cosine, worker_env)
from tokenizer.checkpoint import build_tokenizer, save_tokenizer
from tokenizer.quantizer import usage_stats
from tokenizer.teachers import standardize
from tokenizer.train_config import Plan, TokenizerTrainConfig, teacher_for
from tokenizer.train_data import ShardImages, collate_good, evaluate_heldout, reconstruction_grid
from tokenizer.vqkd import VQKDTrainModule


@dataclass
class TokenizerJob:
    """What the driver hands every worker: the config, the held-out plan, the training fingerprint."""

    cfg: TokenizerTrainConfig
    plan: Plan
    fingerprint: str
    local_mode: bool  # num_workers == 0: nothing is persisted, so rank 0 returns the weights


# --- schedules ----------------------------------------------------------------------------------
def temperature_at(step: int, total: int, cfg: TokenizerTrainConfig) -> float:
    horizon = max(1.0, cfg.temperature_anneal * total)
    t = min(1.0, step / horizon)
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** t


# --- the model under training -------------------------------------------------------------------
class _Trainee:
    """Builds the tokenizer (+ decoder and teacher for VQ-KD) and runs one training forward."""

    def __init__(self, cfg: TokenizerTrainConfig, device: torch.device):
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.model)
        self.teacher = None
        if cfg.model.kind == "vqkd":
            q = self.tokenizer.quantizer
            q.decay, q.kmeans_iters, q.restart_every, q.seed = cfg.ema_decay, cfg.kmeans_iters, cfg.restart_every, cfg.seed
            self.teacher = teacher_for(cfg).to(device)
            self.module = VQKDTrainModule(self.tokenizer, self.teacher.dim)
        else:
            self.module = self.tokenizer
        self.module.to(device)

    def forward(self, model: torch.nn.Module, x: torch.Tensor, step: int, total: int, quantize: bool = True):
        if self.teacher is not None:
            targets = self.teacher(x)
            if self.cfg.standardize_targets:
                targets = standardize(targets)
            return model(x, targets, self.cfg.commitment_weight, quantize)
        tau = temperature_at(step, total, self.cfg)
        return model(x, temperature=tau, kl_weight=self.cfg.kl_weight, hard=self.cfg.gumbel_hard)

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}
        if self.cfg.model.kind == "vqkd":
            state["quantizer"] = self.tokenizer.quantizer.training_state()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if "quantizer" in state:
            self.tokenizer.quantizer.load_training_state(state["quantizer"])


def _gather_codebooks(tok) -> dict[str, Any]:
    cb = tok.codebook().detach().float().contiguous()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.zeros_like(cb) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, cb)
    else:
        gathered = [cb]
    shas = [hashlib.sha256(g.cpu().numpy().tobytes()).hexdigest()[:16] for g in gathered]
    diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return {"ranks": len(gathered), "sha256": shas, "max_abs_diff": diff, "identical": len(set(shas)) == 1}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG state(s): saved in checkpoints so a resumed run draws what an uninterrupted one would."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class EpochStats:
    """One epoch's sums on the device (a float() per step would stall a GPU): loss, reconstruction, the
    commitment/KL term, images, the untrained model's loss; code counts; bad inputs. Reduced at the end."""

    def __init__(self, vocab: int, device: torch.device, world: int):
        self.device, self.world = device, world
        self.counts = torch.zeros(vocab, dtype=torch.float64, device=device)
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, rec*n, aux*n, n, first-step loss
        self.bad = 0
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def add(self, step: int, loss: torch.Tensor, idx: torch.Tensor | None, parts: dict[str, torch.Tensor], n: int) -> None:
        loss_d = loss.detach().double()
        if step == 0:
            self.sums[4] = loss_d / self.world  # the untrained model's loss, for reference
        if idx is not None:  # None while the codebook warms up
            self.counts += torch.bincount(idx.reshape(-1), minlength=len(self.counts)).to(self.counts)
        aux = parts.get("commit", parts.get("kl"))
        aux_d = aux.detach().double() if aux is not None else torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums[:4] += torch.stack([loss_d * n, parts["rec"].detach().double() * n, aux_d * n,
                                      torch.tensor(float(n), dtype=torch.float64, device=self.device)])

    def metrics(self, env: WorkerEnv, epoch: int, lr: float, vqkd: bool) -> dict[str, Any]:
        counts, sums = env.all_reduce(self.counts), env.all_reduce(self.sums)
        bad = env.all_reduce(torch.tensor([self.bad], dtype=torch.float64, device=self.device))
        n = max(1.0, float(sums[3]))
        return {
            "epoch": epoch + 1,
            "loss": float(sums[0]) / n,
            "rec": float(sums[1]) / n,
            ("commit" if vqkd else "kl"): float(sums[2]) / n,
            **usage_stats(counts.cpu()),
            **({"first_step_loss": float(sums[4])} if epoch == 0 else {}),
            "lr": lr,
            "bad_inputs": int(bad.item()),
            "seconds": round(time.perf_counter() - self.t0, 2),
            "cpu_seconds": round(time.process_time() - self.c0, 2),  # rank 0's process: wall >> cpu means contention
        }


def _epoch_line(m: dict[str, Any], epochs: int, vocab: int, quantizing: bool) -> str:
    return (
        f"epoch {m['epoch']}/{epochs}: loss {m['loss']:.4f} (rec {m['rec']:.4f}), "
        + (f"codes used {m['codes_used']}/{vocab}, perplexity {m['perplexity']:.1f}, "
           if quantizing else "codebook warm-up (not quantising yet), ")
        + f"lr {m['lr']:.2e}, {m['seconds']:.1f} s (cpu {m['cpu_seconds']:.1f} s)"
        + (f", {m['bad_inputs']} bad inputs skipped" if m["bad_inputs"] else "")
        + (f", restarted {m['restarted_codes']} dead codes" if m.get("restarted_codes") else "")
        + (f", temperature {m['temperature']:.3f}" if "temperature" in m else "")
    )


# --- the per-worker loop ------------------------------------------------------------------------
def train_loop_per_worker(job: TokenizerJob) -> dict[str, Any] | None:
    cfg, plan = job.cfg, job.plan
    env = worker_env(cpus=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, amp=cfg.amp)
    rank, world, device = env.rank, env.world, env.device
    log = lambda msg: env.say(f"[tokenizer] {msg}")  # noqa: E731
    trainee = _Trainee(cfg, device)
    tok, k = trainee.tokenizer, cfg.model.vocab_size
    optimizer = torch.optim.AdamW(param_groups(trainee.module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    start_epoch, history, bad_examples = _resume(trainee, optimizer, job, device, log)
    model = env.wrap(trainee.module, broadcast_buffers=False)  # the quantizer all-reduces its own EMA statistics

    # Equal, disjoint slices of the training items: every rank runs the same number of steps.
    train = range(plan.train_start, plan.train_stop)
    per_rank = len(train) // world
    if per_rank == 0:
        raise ValueError(f"source {cfg.source!r} has {len(train)} training items, fewer than {world} workers")
    bs = max(1, min(cfg.batch_size // world, per_rank))
    steps = per_rank // bs
    total, warmup = steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))
    codebook_from = int(round(cfg.codebook_warmup * total)) if trainee.teacher is not None else 0
    data = ShardImages(cfg.source, train[rank::world][:per_rank], cfg.model.input_size, augment=cfg.augment,
                       crop_scale=cfg.crop_scale, seed=cfg.seed, cache=cfg.cache_images)
    if start_epoch == 0:
        log(f"{tok.describe()}; {world} worker(s) x {bs} images/step, {steps} steps/epoch, {cfg.epochs} epochs"
            + (f", teacher {cfg.teacher} ({trainee.teacher.dim}-d)" if trainee.teacher is not None else ""))

    last_batch = None
    for epoch in range(start_epoch, cfg.epochs):
        trainee.module.train()
        data.epoch = epoch
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, rank))
        order = torch.randperm(len(data), generator=g)[: steps * bs].tolist()
        loader = torch.utils.data.DataLoader(data, batch_size=bs, sampler=order, collate_fn=collate_good,
                                             num_workers=cfg.loader_workers)
        stats = EpochStats(k, device, world)
        restarted0 = getattr(getattr(tok, "quantizer", None), "restarted_total", 0)
        for i, (batch, bad_reasons) in enumerate(loader):
            step = epoch * steps + i
            stats.bad += len(bad_reasons)
            bad_examples += bad_reasons[: max(0, 5 - len(bad_examples))]
            if batch is None:  # a batch of undecodable items: repeat the last good one (DDP needs a step)
                if last_batch is None:
                    raise ValueError(f"rank {rank}: no decodable image in the first batch ({bad_reasons[:3]})")
                batch = last_batch
            last_batch = batch
            lr = warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)
            apply_lr(optimizer, lr)
            x = batch.to(device, non_blocking=True).float().div_(255.0)  # [0, 1]: the tokenizer normalises
            with env.autocast():
                loss, idx, parts = trainee.forward(model, x, step, total, quantize=step >= codebook_from)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainee.module.parameters(), cfg.grad_clip)
            optimizer.step()
            stats.add(step, loss, idx, parts, x.shape[0])
        metrics = stats.metrics(env, epoch, lr, vqkd=trainee.teacher is not None)
        if trainee.teacher is None:
            metrics["temperature"] = temperature_at((epoch + 1) * steps - 1, total, cfg)
        else:
            metrics["restarted_codes"] = int(tok.quantizer.restarted_total - restarted0)
        history.append(metrics)
        log(_epoch_line(metrics, cfg.epochs, k, quantizing=(epoch + 1) * steps > codebook_from))

        def write_checkpoint(directory: Path) -> None:
            save_tokenizer(tok, directory)  # the checkpoint is itself a loadable tokenizer directory
            save_torch({"fingerprint": job.fingerprint, "epoch": epoch, "history": history,
                        "optimizer": optimizer.state_dict(), "rng": _rng_state(device), "bad_examples": bad_examples,
                        **trainee.training_state()}, directory / "state.pt")

        if epoch + 1 == cfg.epochs or (epoch + 1) % cfg.checkpoint_every == 0:
            report(metrics, name=f"epoch-{epoch + 1:04d}", write=write_checkpoint)
        else:
            report(metrics)

    return _summary(job, tok, bs, device, rank, history, start_epoch, bad_examples)


def _resume(trainee: _Trainee, optimizer: torch.optim.Optimizer, job: TokenizerJob, device: torch.device,
            log) -> tuple[int, list[dict], list[str]]:
    """(first epoch, history, bad examples) from the run's newest checkpoint when this same training
    config made it; else a fresh start."""
    with restored() as d:
        state = load_torch(d / "state.pt") if d is not None else None
    if state is None:
        return 0, [], []
    if state.get("fingerprint") != job.fingerprint:
        log("the run's checkpoint was made by another config: starting afresh")
        return 0, [], []
    trainee.load_training_state(state)
    optimizer.load_state_dict(state["optimizer"])
    if "rng" in state:  # dead-code restarts draw from torch's global RNG (rank 0 picks for all ranks)
        _set_rng_state(state["rng"], device)
    start_epoch = int(state["epoch"]) + 1
    log(f"resuming after epoch {start_epoch} of {job.cfg.epochs} from the run's checkpoint")
    return start_epoch, list(state["history"]), list(state.get("bad_examples", []))  # rank 0's bad examples


def _summary(job: TokenizerJob, tok, bs: int, device: torch.device, rank: int, history: list[dict],
             start_epoch: int, bad_examples: list[str]) -> dict[str, Any] | None:
    """Rank 0's result for the driver: history, held-out usage, the DDP codebook check (all ranks join)."""
    codebook_check = _gather_codebooks(tok)
    if rank != 0:
        return None
    tok.eval()
    result = {
        "history": history,
        "heldout": evaluate_heldout(tok, job.plan, batch_size=max(bs, 32), device=device),
        "codebook_check": codebook_check,
        "resumed_from_epoch": start_epoch,
        "bad_examples": bad_examples,
        "reconstructions": reconstruction_grid(tok, job.plan, device) if tok.kind == "dvae" else None,
    }
    if job.local_mode:  # nothing is persisted in local mode: hand the weights back
        result["state"] = {k: v.numpy() for k, v in tok.export_state_dict().items()}
    return result
