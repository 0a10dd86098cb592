"""Train a tokenizer as a Ray Train ``TorchTrainer`` job (DDP: gloo on CPU, nccl on GPU).

``train_tokenizer(cfg)``:

1. returns at once if ``cfg.out`` already holds a tokenizer trained from the same config and source
   (``train.json`` records the training fingerprint and the tokenizer id);
2. otherwise runs ``_train_loop`` on ``num_workers`` Ray Train workers. Each rank reads an equal-sized,
   disjoint slice of the source's training items (by index), so every rank runs the same number of
   steps; undecodable items are counted and dropped from their batch, never a crash. AdamW, linear
   warmup then cosine decay, per-epoch loss and codebook usage over the whole epoch (codes used,
   perplexity, all-reduced over ranks). A checkpoint (itself a loadable tokenizer directory plus
   ``state.pt``) is reported through ``ray.train.report`` under ``RunConfig(name, storage_path)``:
   a rerun with the same run name resumes from it;
3. saves the tokenizer to ``cfg.out`` (``config.json`` + ``model.safetensors``), the resolved config
   (``config.yaml``), ``train.json`` and, for the dVAE, ``reconstructions.png``; prints the
   codebook usage on held-out images.

Held-out images: ``heldout_source`` if set; for ``shapes`` the ``test`` split; otherwise the last
``heldout_size`` items of the source (at most a fifth of it), which are then left out of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode

import numpy as np
import torch

from pipeline.config import ConfigError, to_dict
from tokenizer.base import TokenizerConfig

# Execution-only fields: changing them does not change what is trained.
_EXECUTION_FIELDS = (
    "out", "storage_path", "run_name", "num_workers", "cpus_per_worker", "use_gpu",
    "loader_workers", "checkpoint_every",
)


@dataclass
class TokenizerTrainConfig:
    source: str = "shapes?n=2000&size=64&split=train"
    out: str = "out/tokenizer"
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    # teacher (VQ-KD): "hog" or "timm:<model_name>" with a local safetensors file
    teacher: str = "hog"
    teacher_weights: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    hog_bins: int = 9
    hog_cell: int | None = None  # default: half the patch size
    standardize_targets: bool = True  # per-dimension standardisation of teacher features per batch
    # optimisation
    epochs: int = 10
    batch_size: int = 64  # global: split evenly across workers
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # 0 = off
    amp: bool = True  # bf16 autocast on GPU (never on CPU: it is slower there)
    # data
    augment: bool = True  # random-resized crops + flips; else the centre view
    crop_scale: tuple[float, float] = (0.5, 1.0)
    cache_images: bool = True  # keep decoded images in memory (small sources)
    loader_workers: int = 0  # DataLoader processes per Ray worker
    heldout_source: str | None = None
    heldout_size: int = 256
    # VQ-KD codebook
    ema_decay: float = 0.99
    commitment_weight: float = 1.0
    kmeans_iters: int = 10
    restart_every: int = 20  # steps between dead-code restarts (0 = never)
    # dVAE
    temperature_start: float = 1.0
    temperature_end: float = 0.0625
    temperature_anneal: float = 0.8  # fraction of training over which the temperature decays
    kl_weight: float = 0.0
    gumbel_hard: bool = False  # straight-through: one-hot samples forward, relaxed gradients backward
    # execution
    num_workers: int = 1  # Ray Train workers (0 = in the driver process, nothing persisted)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    seed: int = 0
    run_name: str | None = None  # default: tokenizer-<kind>-<fingerprint>
    storage_path: str | None = None  # Ray Train storage; default: <parent of out>/ray
    checkpoint_every: int = 1  # epochs (the last epoch is always checkpointed)

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {self.cpus_per_worker}"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.temperature_start > 0 and self.temperature_end > 0, "temperatures must be > 0"),
            (self.heldout_size >= 1, f"heldout_size must be >= 1, got {self.heldout_size}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# --- planning (driver side) ---------------------------------------------------------------------
def training_fingerprint(cfg: TokenizerTrainConfig, source_fingerprint: str) -> str:
    d = to_dict(cfg)
    for name in _EXECUTION_FIELDS:
        d.pop(name, None)
    doc = json.dumps({"config": d, "source": source_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _with_params(spec: str, **params: Any) -> str:
    body, _, query = spec.partition("?")
    q = dict(parse_qsl(query, keep_blank_values=True))
    q.update({k: str(v) for k, v in params.items()})
    return f"{body}?{urlencode(q)}"


@dataclass
class Plan:
    train_start: int
    train_stop: int
    heldout_spec: str
    heldout_start: int
    heldout_stop: int
    heldout_desc: str


def make_plan(cfg: TokenizerTrainConfig, source) -> Plan:
    from pipeline.sources import open_source

    n = len(source)
    if cfg.heldout_source:
        held = open_source(cfg.heldout_source)
        k = min(cfg.heldout_size, len(held))
        return Plan(0, n, cfg.heldout_source, 0, k, f"{k} images of {cfg.heldout_source!r}")
    if source.kind == "shapes":
        split = "heldout" if getattr(source, "split", "train") == "test" else "test"
        spec = _with_params(source.spec, split=split, n=cfg.heldout_size)
        return Plan(0, n, spec, 0, cfg.heldout_size, f"{cfg.heldout_size} images of the shapes {split!r} split")
    k = min(cfg.heldout_size, n // 5)
    if k == 0:
        k = min(cfg.heldout_size, n)
        return Plan(0, n, source.spec, 0, k, f"{k} training images (source too small to hold any out)")
    return Plan(0, n - k, source.spec, n - k, n, f"the last {k} items of the source (not trained on)")


# --- data (worker side) -------------------------------------------------------------------------
class ShardImages(torch.utils.data.Dataset):
    """Items ``indices`` of a source rendered at ``size``: ``(uint8 [3, S, S] | None, bad reason)``."""

    def __init__(self, spec: str, indices, size: int, *, augment: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0), seed: int = 0, cache: bool = False):
        self.spec, self.indices, self.size = spec, indices, size
        self.augment, self.crop_scale, self.seed, self.cache = augment, tuple(crop_scale), seed, cache
        self.epoch = 0
        self._source = None
        self._decoded: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None  # reopened from the spec in each loader process
        return state

    def _load(self, i: int) -> tuple[str, np.ndarray | None, str | None]:
        if i in self._decoded:
            return self._decoded[i]
        from pipeline.images import BadImageError, decode_rgb
        from pipeline.sources import BadInput, Partition, open_source

        if self._source is None:
            self._source = open_source(self.spec)
        try:
            item = next(iter(self._source.iter_partition(Partition(-1, i, i + 1))))
        except Exception as e:  # an unreadable item must not stop training
            res = (f"item-{i}", None, f"{self.spec}[{i}]: cannot read ({type(e).__name__}: {e})")
        else:
            if isinstance(item, BadInput):
                res = (item.key, None, f"{item.origin}: {item.reason}")
            else:
                try:
                    res = (item.key, np.asarray(decode_rgb(item.data)), None)
                except BadImageError as e:
                    res = (item.key, None, f"{item.origin}: {e.reason}")
        if self.cache:
            self._decoded[i] = res
        return res

    def __getitem__(self, j: int):
        from PIL import Image

        from pipeline.views import centre_view, make_views, render_view

        key, pixels, reason = self._load(self.indices[j])
        if pixels is None:
            return None, reason
        img = Image.fromarray(pixels)
        if self.augment:
            view = make_views(key, img.width, img.height, 2, seed=self.seed * 1_000_003 + self.epoch, scale=self.crop_scale)[0]
        else:
            view = centre_view(img.width, img.height)
        out = np.asarray(render_view(img, view, self.size), dtype=np.uint8)
        return torch.from_numpy(out.copy()).permute(2, 0, 1), None


def collate_good(items):
    good = [t for t, _ in items if t is not None]
    bad = [r for t, r in items if t is None]
    return (torch.stack(good) if good else None), bad


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
        from tokenizer.base import build_tokenizer

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.model)
        self.teacher = None
        if cfg.model.kind == "vqkd":
            from tokenizer.teachers import build_teacher
            from tokenizer.vqkd import VQKDTrainModule

            q = self.tokenizer.quantizer
            q.decay, q.kmeans_iters, q.restart_every, q.seed = cfg.ema_decay, cfg.kmeans_iters, cfg.restart_every, cfg.seed
            self.teacher = build_teacher(
                cfg.teacher, grid=cfg.model.grid, input_size=cfg.model.input_size, weights=cfg.teacher_weights,
                kwargs=cfg.teacher_kwargs, hog_bins=cfg.hog_bins, hog_cell=cfg.hog_cell,
            ).to(device)
            self.module = VQKDTrainModule(self.tokenizer, self.teacher.dim)
        else:
            self.module = self.tokenizer
        self.module.to(device)

    def forward(self, model: torch.nn.Module, x: torch.Tensor, step: int, total: int):
        if self.teacher is not None:
            targets = self.teacher(x)
            if self.cfg.standardize_targets:
                from tokenizer.teachers import standardize

                targets = standardize(targets)
            return model(x, targets, self.cfg.commitment_weight)
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


# --- the per-worker loop ------------------------------------------------------------------------
def _quiet_worker_logs() -> None:
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray 2.60 logs every report at INFO on a logger named after its file (internal; best effort)
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except Exception:
        pass
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "Could not load library with AVX2 ..."


def _train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.config import from_dict
    from tokenizer.base import save_tokenizer
    from tokenizer.quantizer import usage_stats

    cfg = from_dict(TokenizerTrainConfig, loop_config["cfg"])
    plan = Plan(**loop_config["plan"])
    fingerprint = loop_config["fingerprint"]
    rank, world = _rank_world()
    _quiet_worker_logs()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    amp = device.type == "cuda" and cfg.amp
    # sys.__stdout__: Ray Train's print patch would otherwise show each line twice.
    log = (lambda msg: print(f"[tokenizer] {msg}", file=sys.__stdout__, flush=True)) if rank == 0 else (lambda msg: None)

    trainee = _Trainee(cfg, device)
    tok, k = trainee.tokenizer, cfg.model.vocab_size
    optimizer = torch.optim.AdamW(_param_groups(trainee.module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))

    # Resume from the run's latest checkpoint when it was made by this same training config.
    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fingerprint:
            trainee.load_training_state(state)
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
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
    data = ShardImages(cfg.source, shard, cfg.model.input_size, augment=cfg.augment,
                       crop_scale=cfg.crop_scale, seed=cfg.seed, cache=cfg.cache_images)
    if start_epoch == 0:
        log(f"{tok.describe()}; {world} worker(s) x {bs} images/step, {steps} steps/epoch, {cfg.epochs} epochs"
            + (f", teacher {cfg.teacher} ({trainee.teacher.dim}-d)" if trainee.teacher is not None else ""))

    last_batch = None
    bad_examples: list[str] = []
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
                loss, idx, parts = trainee.forward(model, x, step, total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainee.module.parameters(), cfg.grad_clip)
            optimizer.step()
            n = x.shape[0]
            if step == 0:
                sums[4] = float(loss.detach()) / world  # the untrained model's loss, for reference
            counts += torch.bincount(idx.reshape(-1), minlength=k).to(counts)
            aux = parts.get("commit", parts.get("kl", torch.zeros(())))
            sums[:4] += torch.tensor([float(loss.detach()) * n, float(parts["rec"]) * n, float(aux) * n, n], dtype=torch.float64, device=device)
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
            f"codes used {metrics['codes_used']}/{k}, perplexity {metrics['perplexity']:.1f}, "
            f"lr {lr:.2e}, {metrics['seconds']:.1f} s (cpu {metrics['cpu_seconds']:.1f} s)"
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
                             "optimizer": optimizer.state_dict(), **trainee.training_state()}
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


@torch.no_grad()
def evaluate_heldout(tok, plan: Plan, batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Codebook usage (codes used, perplexity) of the tokens of the held-out images."""
    from tokenizer.quantizer import usage_stats

    data = ShardImages(plan.heldout_spec, range(plan.heldout_start, plan.heldout_stop), tok.input_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_good)
    counts = torch.zeros(tok.vocab_size, dtype=torch.float64)
    images = bad = 0
    for batch, reasons in loader:
        bad += len(reasons)
        if batch is None:
            continue
        ids = tok.encode(batch.to(device).float().div_(255.0))
        counts += torch.bincount(ids.reshape(-1).cpu(), minlength=tok.vocab_size).double()
        images += batch.shape[0]
    return {"images": images, "bad_inputs": bad, "tokens": int(counts.sum()), "description": plan.heldout_desc,
            "vocab_size": tok.vocab_size, **usage_stats(counts)}


@torch.no_grad()
def reconstruction_grid(tok, plan: Plan, device: torch.device | str = "cpu", n: int = 8) -> np.ndarray:
    """uint8 HWC image: held-out inputs (left) beside the dVAE's decode of their tokens (right)."""
    data = ShardImages(plan.heldout_spec, range(plan.heldout_start, min(plan.heldout_stop, plan.heldout_start + n)), tok.input_size)
    batch, _ = collate_good([data[j] for j in range(len(data))])
    if batch is None:
        return np.zeros((tok.input_size, 2 * tok.input_size, 3), dtype=np.uint8)
    x = batch.to(device).float().div_(255.0)
    recon = tok.decode(tok.encode(x))
    pairs = torch.cat([x, recon], dim=3)  # [B, 3, S, 2S]
    pad = torch.ones(pairs.shape[0], 3, 2, pairs.shape[3], device=pairs.device)
    rows = torch.cat([torch.cat([p, q], dim=1) for p, q in zip(pairs, pad)], dim=1)  # [3, B*(S+2), 2S]
    return (rows.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


# --- the driver ---------------------------------------------------------------------------------
def _local_or_uri(path: str) -> str:
    from pipeline import storage

    return path if storage.is_uri(path) else str(Path(path).expanduser().resolve())


def _parent(path: str) -> str:
    from pipeline import storage

    if storage.is_uri(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def current_tokenizer(out: str, fingerprint: str) -> dict[str, Any] | None:
    """The ``train.json`` of ``out`` if it records this fingerprint and the checkpoint is intact."""
    from pipeline import storage
    from tokenizer.base import tokenizer_id

    meta_path = storage.join(out, "train.json")
    if not storage.exists(meta_path):
        return None
    try:
        meta = json.loads(storage.read_bytes(meta_path))
        if meta.get("fingerprint") != fingerprint or tokenizer_id(out) != meta.get("tokenizer_id"):
            return None
    except (ValueError, OSError):
        return None
    return meta


def train_tokenizer(cfg: TokenizerTrainConfig, address: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Train (or reuse) the tokenizer described by ``cfg``; returns its directory (``cfg.out``)."""
    from pipeline import storage
    from pipeline.cli import StageError
    from pipeline.ray_context import ray_session
    from pipeline.sources import open_source

    out = _local_or_uri(cfg.out)
    source = open_source(cfg.source)
    if len(source) == 0:
        raise ConfigError(f"source {cfg.source!r} has no items")
    fingerprint = training_fingerprint(cfg, source.fingerprint())
    meta = current_tokenizer(out, fingerprint)
    if meta is not None:
        held = meta.get("heldout", {})
        log(
            f"tokenizer {meta['tokenizer_id']} in {out} is current (same config and source, fingerprint {fingerprint}): "
            f"not retraining; held-out codebook usage {held.get('codes_used')}/{held.get('vocab_size')}"
        )
        return Path(out) if not storage.is_uri(out) else out  # type: ignore[return-value]

    if cfg.model.kind == "vqkd":  # fail early, in the driver, on a bad teacher spec or weights file
        from tokenizer.teachers import build_teacher

        build_teacher(cfg.teacher, grid=cfg.model.grid, input_size=cfg.model.input_size, weights=cfg.teacher_weights,
                      kwargs=cfg.teacher_kwargs, hog_bins=cfg.hog_bins, hog_cell=cfg.hog_cell)
    plan = make_plan(cfg, source)
    storage_path = _local_or_uri(cfg.storage_path) if cfg.storage_path else storage.join(_parent(out), "ray")
    run_name = cfg.run_name or f"tokenizer-{cfg.model.kind}-{fingerprint}"
    log(f"tokenizer: training {cfg.model.kind} on {source.describe()}; run {run_name!r} under {storage_path}")
    start = time.perf_counter()
    with ray_session(address):
        result = _fit(cfg, plan, fingerprint, run_name, storage_path)
    seconds = time.perf_counter() - start

    info = result.return_value or {}
    if "state" in info:
        from tokenizer.base import build_tokenizer

        tok = build_tokenizer(cfg.model)
        tok.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in info["state"].items()})
        tok.mark_loaded()
    elif result.checkpoint is not None:
        from tokenizer.base import load_tokenizer

        with result.checkpoint.as_directory() as d:
            tok = load_tokenizer(d)
    else:
        raise StageError(f"tokenizer run {run_name!r} finished without a checkpoint or weights")
    if not info:
        raise StageError(f"tokenizer run {run_name!r} returned no summary from rank 0")

    from tokenizer.base import save_tokenizer

    tok_id = save_tokenizer(tok, out)
    if info.get("reconstructions") is not None:
        from pipeline.images import encode_png

        storage.write_bytes_atomic(storage.join(out, "reconstructions.png"), encode_png(info["reconstructions"]))
    from pipeline.config import dump_config

    storage.write_bytes_atomic(storage.join(out, "config.yaml"), dump_config(cfg).encode())
    held = info["heldout"]
    meta = {
        "tokenizer_id": tok_id,
        "fingerprint": fingerprint,
        "source": cfg.source,
        "source_fingerprint": source.fingerprint(),
        "config": to_dict(cfg),
        "run_name": run_name,
        "storage_path": storage_path,
        "heldout": held,
        "history": info["history"],
        "codebook_check": info["codebook_check"],
        "resumed_from_epoch": info["resumed_from_epoch"],
        "bad_examples": info["bad_examples"],
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    storage.write_bytes_atomic(storage.join(out, "train.json"), (json.dumps(meta, indent=2) + "\n").encode())
    check = info["codebook_check"]
    log(
        f"tokenizer {tok_id} saved to {out} ({seconds:.0f} s); held-out codebook usage: {held['codes_used']}/{held['vocab_size']} "
        f"codes ({100 * held['usage']:.1f}%), perplexity {held['perplexity']:.1f}, on {held['description']}"
        + (f"; codebooks identical on all {check['ranks']} ranks" if check["ranks"] > 1 and check["identical"] else "")
    )
    if check["ranks"] > 1 and not check["identical"]:
        log(f"warning: codebooks differ across ranks (max abs diff {check['max_abs_diff']:.3g})")
    return Path(out) if not storage.is_uri(out) else out  # type: ignore[return-value]


def _fit(cfg: TokenizerTrainConfig, plan: Plan, fingerprint: str, run_name: str, storage_path: str):
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cli import StageError

    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "plan": to_dict(plan),
            "fingerprint": fingerprint,
            "local_mode": cfg.num_workers == 0,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources if cfg.num_workers else None),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # our per-epoch line says what matters
        ),
    )
    try:
        return trainer.fit()
    except Exception as e:
        from ray.train import TrainingFailedError

        if isinstance(e, TrainingFailedError):
            raise StageError(f"tokenizer training failed: {e}") from e
        raise
