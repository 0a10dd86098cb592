"""The training loop each Ray Train worker runs (one DDP rank).

Each rank reads an equal-sized, disjoint slice of the source's training items (by index), so every
rank runs the same number of steps; undecodable items are counted and dropped from their batch, never
a crash. AdamW, linear warmup then cosine decay, per-epoch loss and codebook usage over the whole
epoch (codes used, perplexity, all-reduced over ranks). A checkpoint (itself a loadable tokenizer
directory plus ``state.pt``) is reported through ``ray.train.report``; rank 0 returns the summary the
driver saves.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

from tokenizer.train_config import Plan, TokenizerTrainConfig, teacher_for
from tokenizer.train_data import ShardImages, collate_good, evaluate_heldout, reconstruction_grid


# --- schedules ----------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t))


def temperature_at(step: int, total: int, cfg: TokenizerTrainConfig) -> float:
    horizon = max(1.0, cfg.temperature_anneal * total)
    t = min(1.0, step / horizon)
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** t


def _param_groups(module: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- the model under training -------------------------------------------------------------------
class _Trainee:
    """Builds the tokenizer (+ decoder and teacher for VQ-KD) and runs one training forward."""

    def __init__(self, cfg: TokenizerTrainConfig, device: torch.device):
        from tokenizer.checkpoint import build_tokenizer

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.model)
        self.teacher = None
        if cfg.model.kind == "vqkd":
            from tokenizer.vqkd import VQKDTrainModule

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
                from tokenizer.teachers import standardize

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


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _gather_codebooks(tok) -> dict[str, Any]:
    import torch.distributed as dist

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


# --- the per-worker loop ------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.config import from_dict
    from pipeline.ray_context import quiet_train_worker_logs
    from tokenizer.checkpoint import save_tokenizer
    from tokenizer.quantizer import usage_stats

    cfg = from_dict(TokenizerTrainConfig, loop_config["cfg"])
    plan = Plan(**loop_config["plan"])
    fingerprint = loop_config["fingerprint"]
    rank, world = _rank_world()
    quiet_train_worker_logs()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    amp = device.type == "cuda" and cfg.amp
    # sys.__stdout__: Ray Train's print patch would otherwise show each line twice.
    log = (lambda msg: print(f"[tokenizer] {msg}", file=sys.__stdout__, flush=True)) if rank == 0 else (lambda msg: None)

    trainee = _Trainee(cfg, device)
    tok, k = trainee.tokenizer, cfg.model.vocab_size
    optimizer = torch.optim.AdamW(_param_groups(trainee.module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))

    # Resume from the run's latest checkpoint when it was made by this same training config.
    start_epoch, history, bad_examples = 0, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fingerprint:
            trainee.load_training_state(state)
            optimizer.load_state_dict(state["optimizer"])
            if "rng" in state:  # dead-code restarts draw from torch's global RNG (rank 0 picks for all ranks)
                _set_rng_state(state["rng"], device)
            start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
            bad_examples = list(state.get("bad_examples", []))  # rank 0's, the ones the result reports
            log(f"resuming after epoch {start_epoch} of {cfg.epochs} from the run's checkpoint")
        else:
            log("the run's checkpoint was made by another config: starting afresh")

    model = trainee.module
    if world > 1:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    # Equal, disjoint slices of the training items: every rank runs the same number of steps.
    train = range(plan.train_start, plan.train_stop)
    per_rank = len(train) // world
    if per_rank == 0:
        raise ValueError(f"source {cfg.source!r} has {len(train)} training items, fewer than {world} workers")
    shard = train[rank::world][:per_rank]
    bs = max(1, min(cfg.batch_size // world, per_rank))
    steps = per_rank // bs
    total = steps * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps))
    codebook_from = int(round(cfg.codebook_warmup * total)) if trainee.teacher is not None else 0
    data = ShardImages(cfg.source, shard, cfg.model.input_size, augment=cfg.augment,
                       crop_scale=cfg.crop_scale, seed=cfg.seed, cache=cfg.cache_images)
    if start_epoch == 0:
        log(f"{tok.describe()}; {world} worker(s) x {bs} images/step, {steps} steps/epoch, {cfg.epochs} epochs"
            + (f", teacher {cfg.teacher} ({trainee.teacher.dim}-d)" if trainee.teacher is not None else ""))

    last_batch = None
    for epoch in range(start_epoch, cfg.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        trainee.module.train()
        data.epoch = epoch
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 104729 + rank)
        order = torch.randperm(len(data), generator=g)[: steps * bs].tolist()
        loader = torch.utils.data.DataLoader(data, batch_size=bs, sampler=order, collate_fn=collate_good,
                                             num_workers=cfg.loader_workers)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, rec*n, aux*n, n, first-step loss
        bad = 0
        restarted0 = getattr(getattr(tok, "quantizer", None), "restarted_total", 0)
        for i, (batch, bad_reasons) in enumerate(loader):
            step = epoch * steps + i
            bad += len(bad_reasons)
            if bad_reasons and len(bad_examples) < 5:
                bad_examples += bad_reasons[: 5 - len(bad_examples)]
            if batch is None:  # a batch of undecodable items: repeat the last good one (DDP needs a step)
                if last_batch is None:
                    raise ValueError(f"rank {rank}: no decodable image in the first batch ({bad_reasons[:3]})")
                batch = last_batch
            last_batch = batch
            lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = batch.to(device, non_blocking=True).float().div_(255.0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, idx, parts = trainee.forward(model, x, step, total, quantize=step >= codebook_from)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainee.module.parameters(), cfg.grad_clip)
            optimizer.step()
            # metrics stay on the device until the epoch ends (a float() per step would stall a GPU)
            n = x.shape[0]
            loss_d = loss.detach().double()
            if step == 0:
                sums[4] = loss_d / world  # the untrained model's loss, for reference
            if idx is not None:  # None while the codebook warms up
                counts += torch.bincount(idx.reshape(-1), minlength=k).to(counts)
            aux = parts.get("commit", parts.get("kl"))
            aux_d = aux.detach().double() if aux is not None else torch.zeros((), dtype=torch.float64, device=device)
            sums[:4] += torch.stack([loss_d * n, parts["rec"].detach().double() * n, aux_d * n,
                                     torch.tensor(float(n), dtype=torch.float64, device=device)])
        _all_reduce(counts)
        _all_reduce(sums)
        bad_t = _all_reduce(torch.tensor([bad], dtype=torch.float64, device=device))
        n = max(1.0, float(sums[3]))
        metrics = {
            "epoch": epoch + 1,
            "loss": float(sums[0]) / n,
            "rec": float(sums[1]) / n,
            ("commit" if trainee.teacher is not None else "kl"): float(sums[2]) / n,
            **usage_stats(counts.cpu()),
            **({"first_step_loss": float(sums[4])} if epoch == 0 else {}),
            "lr": lr,
            "bad_inputs": int(bad_t.item()),
            "seconds": round(time.perf_counter() - t0, 2),
            "cpu_seconds": round(time.process_time() - c0, 2),  # rank 0's process: wall >> cpu means contention
        }
        if trainee.teacher is None:
            metrics["temperature"] = temperature_at((epoch + 1) * steps - 1, total, cfg)
        else:
            metrics["restarted_codes"] = int(tok.quantizer.restarted_total - restarted0)
        history.append(metrics)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.4f} (rec {metrics['rec']:.4f}), "
            + (f"codes used {metrics['codes_used']}/{k}, perplexity {metrics['perplexity']:.1f}, "
               if (epoch + 1) * steps > codebook_from else "codebook warm-up (not quantising yet), ")
            + f"lr {lr:.2e}, {metrics['seconds']:.1f} s (cpu {metrics['cpu_seconds']:.1f} s)"
            + (f", {metrics['bad_inputs']} bad inputs skipped" if metrics["bad_inputs"] else "")
            + (f", restarted {metrics['restarted_codes']} dead codes" if metrics.get("restarted_codes") else "")
            + (f", temperature {metrics['temperature']:.3f}" if "temperature" in metrics else "")
        )
        last = epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_tokenizer(tok, tmp)  # the checkpoint is itself a loadable tokenizer directory
                    state = {"fingerprint": fingerprint, "epoch": epoch, "history": history,
                             "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
                             "bad_examples": bad_examples,
                             **trainee.training_state()}
                    torch.save(state, os.path.join(tmp, "state.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
        else:
            ray.train.report(metrics)

    codebook_check = _gather_codebooks(tok)
    if rank != 0:
        return None
    tok.eval()
    heldout = evaluate_heldout(tok, plan, batch_size=max(bs, 32), device=device)
    result = {
        "history": history,
        "heldout": heldout,
        "codebook_check": codebook_check,
        "resumed_from_epoch": start_epoch,
        "bad_examples": bad_examples,
        "reconstructions": reconstruction_grid(tok, plan, device) if tok.kind == "dvae" else None,
    }
    if loop_config.get("local_mode"):  # nothing is persisted in local mode: hand the weights back
        result["state"] = {k: v.numpy() for k, v in tok.export_state_dict().items()}
    return result
