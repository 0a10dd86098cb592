"""Fine-tuning: the whole encoder plus a linear head, a training loop on the harness (``pipeline.train_harness``).

BEiT's recipe, scaled down: layer-wise learning-rate decay (block ``i`` of ``depth`` gets
``lr * decay^(depth - i)``, the patch embedding, [CLS] and position embeddings
``lr * decay^(depth + 1)``, the head and final norms ``lr``: ``pipeline.train_worker.param_groups``),
stochastic depth (drop path), AdamW without weight decay on biases, norms and embeddings, linear warmup
then cosine decay per step, label smoothing, random-resized-crop + flip augmentation. Top-1 on the
test split after every epoch. ``label_fraction`` trains on a deterministic, class-balanced subset of
the training labels (e.g. 1% or 10%), where pretraining pays most.

The driver puts the decoded images and the encoder weights in the object store; every worker builds
the model, takes its slice of each global batch (all ranks run the same number of steps) and its
slice of the test set, and the counts are all-reduced. Every epoch reports a checkpoint (the
classifier, AdamW, RNG states, the history), so a killed worker restarts inside the run from the
newest finished epoch; the last epoch's checkpoint holds the history and the fine-tuned classifier.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from eval.eval_config import FinetuneConfig
from pipeline.ray_context import cluster_has_gpu
from pipeline.train_harness import FitSpec, fit
from pipeline.tensors import normalize
from pipeline.train_worker import (WorkerEnv, apply_lr, derive_seed, load_torch, load_weights,
                                   param_groups, report, restored, save_json, save_torch, save_weights,
                                   seed_everything, warmup_cosine, worker_env)


# ----------------------------------------------------------------------------------- label subsets


def class_balanced_subset(labels: np.ndarray, keys: list[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices: from each class, the ``round(fraction * n_c)`` (at least 1) samples whose
    ``sha256(seed:key)`` sort first. Deterministic, and independent of the source's order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    chosen: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())
        chosen.extend(ranked[: max(1, int(round(fraction * len(members))))])
    return np.asarray(sorted(chosen), dtype=np.int64)


# ----------------------------------------------------------------------------------- augmentation


def random_resized_crop_flip(
    x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-sample random-resized crop (bilinear, back to the input size) and horizontal flip."""
    from torchvision.ops import roi_align

    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(*scale, generator=gen) * h * w
    logr = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    cw = (area * logr.exp()).sqrt().clamp(4, w)
    ch = (area / logr.exp()).sqrt().clamp(4, h)
    x0 = torch.rand(b, generator=gen) * (w - cw)
    y0 = torch.rand(b, generator=gen) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1).to(x)
    out = roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


# ------------------------------------------------------------------------------------- train loop


def build_classifier(timm_kwargs: dict, state: dict, num_classes: int, drop_path: float, seed: int) -> torch.nn.Module:
    """Beit with a fresh ``num_classes`` head (seeded), encoder weights loaded; only the head may be missing."""
    import timm.models.beit as beit

    kwargs = {**timm_kwargs, "num_classes": num_classes, "drop_path_rate": drop_path}
    seed_everything(seed)
    model = beit.Beit(**kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"encoder weights do not fit the classifier: {bad[:5]}")
    return model


@dataclass
class FinetuneJob:
    """What the driver hands every worker (images and encoder weights as object-store references)."""

    cfg: FinetuneConfig
    data: Any  # ObjectRef of {"train_x", "train_y", "test_x", "test_y"} (uint8 NCHW images, int labels)
    state: Any  # ObjectRef of the encoder's state dict
    encoder: dict[str, Any]  # timm_kwargs, mean, std, img_size, encoder_id
    classes: list[str]
    num_classes: int
    seed: int
    use_gpu: bool


def _prep(pixels: np.ndarray, env: WorkerEnv, mean: torch.Tensor, std: torch.Tensor,
          gen: torch.Generator | None) -> torch.Tensor:
    x = torch.from_numpy(np.array(pixels)).to(env.device)  # a copy: object-store arrays are read-only
    if gen is None:
        return normalize(x, mean, std)
    x = random_resized_crop_flip(x.float().div_(255.0), gen)  # crops interpolate: in [0, 1], then standardise
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _top1(model: torch.nn.Module, env: WorkerEnv, test_x, test_y, mean, std) -> torch.Tensor:
    """Correct predictions on this rank's slice of the test set."""
    model.eval()
    correct = torch.zeros((), dtype=torch.float64)
    with torch.no_grad(), env.autocast():
        for start in range(0, len(test_x), 256):
            logits = model(_prep(test_x[start : start + 256], env, mean, std, None))
            correct += (logits.argmax(1).cpu() == test_y[start : start + 256]).sum().double()
    return correct


def train_loop_per_worker(job: FinetuneJob) -> None:
    cfg, enc = job.cfg, job.encoder
    env = worker_env(cpus=cfg.cpus_per_worker, use_gpu=job.use_gpu)
    data, state = ray.get(job.data), ray.get(job.state)
    core = build_classifier(enc["timm_kwargs"], state, job.num_classes, cfg.drop_path, job.seed)
    model = env.wrap(core)  # DDP when world > 1
    opt = torch.optim.AdamW(param_groups(core, cfg.weight_decay, layer_decay=cfg.layer_decay, base_lr=cfg.lr),
                            lr=cfg.lr, betas=(0.9, 0.999))
    mean = torch.tensor(enc["mean"], device=env.device)
    std = torch.tensor(enc["std"], device=env.device)
    train_x, train_y = data["train_x"], torch.from_numpy(np.array(data["train_y"]))
    test_x, test_y = data["test_x"][env.rank::env.world], torch.from_numpy(np.array(data["test_y"][env.rank::env.world]))
    n, bs = len(train_x), int(cfg.batch_size)
    global_batch = bs * env.world
    steps_per_epoch = max(1, math.ceil(n / global_batch))
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    aug_gen = torch.Generator().manual_seed(derive_seed(job.seed, env.rank))
    start_epoch, history = _resume(core, opt, aug_gen, env)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        order = np.resize(np.random.default_rng(derive_seed(job.seed, epoch)).permutation(n),
                          steps_per_epoch * global_batch)
        loss_sum, loss_n = torch.zeros((), dtype=torch.float64), 0
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * global_batch + env.rank * bs : s * global_batch + (env.rank + 1) * bs])
            apply_lr(opt, warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr))  # x each group's lr_scale
            x = _prep(train_x[idx], env, mean, std, aug_gen if cfg.augment else None)
            y = train_y[idx].to(env.device)
            with env.autocast():
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            loss_sum += float(loss.detach())
            loss_n += 1
            step += 1
        correct = _top1(model, env, test_x, test_y, mean, std)
        counts = env.all_reduce(torch.stack([correct, torch.tensor(float(len(test_x)), dtype=torch.float64), loss_sum,
                                             torch.tensor(float(loss_n), dtype=torch.float64)]))
        history.append({
            "epoch": epoch + 1,
            "train_loss": float(counts[2] / max(counts[3], 1)),
            "top1": float(counts[0] / max(counts[1], 1)),
            "lr": float(warmup_cosine(step - 1, total, warmup, cfg.lr, cfg.min_lr)),
            "seconds": time.perf_counter() - t0,
        })
        h = history[-1]
        env.say(f"fine-tune epoch {h['epoch']}/{cfg.epochs}: train loss {h['train_loss']:.4f}, "
                f"top-1 {h['top1']:.1%} ({h['seconds']:.1f}s)")
        # Ray Train V2 keeps metrics only with a checkpoint: every epoch reports one
        last = epoch + 1 == cfg.epochs
        write = _final_writer(job, core, history) if last else _resume_writer(core, opt, aug_gen, history)
        report({"epoch": epoch + 1, "top1": h["top1"], "history": list(history)}, write=write)


def _resume_writer(core: torch.nn.Module, opt: torch.optim.Optimizer, aug_gen: torch.Generator, history: list[dict]):
    """A mid-run checkpoint: the classifier, AdamW, the RNG states (drop path, augmentation), the history."""
    def write(d: Path) -> None:
        save_weights(core, d / "model.safetensors")
        save_torch(opt.state_dict(), d / "optimizer.pt")
        save_torch({"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}, d / "rng.pt")
        save_json(history, d / "history.json")
        save_json({"epoch": len(history)}, d / "state.json")
    return write


def _final_writer(job: FinetuneJob, core: torch.nn.Module, history: list[dict]):
    """The last epoch's checkpoint: the history and, unless asked not to, the fine-tuned classifier
    (timm Beit, with its head)."""
    def write(d: Path) -> None:
        (d / "history.json").write_text(json.dumps(history, indent=1))
        if job.cfg.keep_model:
            save_weights(core, d / "model.safetensors")
            kwargs = {**job.encoder["timm_kwargs"], "num_classes": job.num_classes, "drop_path_rate": 0.0}
            (d / "config.json").write_text(json.dumps({
                "architecture": "beit", "timm_kwargs": kwargs, "img_size": job.encoder["img_size"],
                "mean": job.encoder["mean"], "std": job.encoder["std"], "classes": job.classes,
                "source_encoder": job.encoder["encoder_id"],
            }, indent=1))
    return write


def _resume(core: torch.nn.Module, opt: torch.optim.Optimizer, aug_gen: torch.Generator,
            env: WorkerEnv) -> tuple[int, list[dict]]:
    """(first epoch, history) from this run's newest mid-run checkpoint (a restarted worker), else (0, [])."""
    with restored() as d:
        if d is None or not (d / "state.json").is_file():
            return 0, []
        core.load_state_dict(load_weights(d / "model.safetensors", env.device), strict=True)
        opt.load_state_dict(load_torch(d / "optimizer.pt", env.device))
        rng = load_torch(d / "rng.pt")
        history = json.loads((d / "history.json").read_text())
    torch.set_rng_state(rng["torch"])
    aug_gen.set_state(rng["augment"])
    env.say(f"fine-tune: resuming after epoch {len(history)}")
    return len(history), history


def finetune(
    encoder,  # eval.features.Encoder
    train,  # eval.features.LabelledImages
    test,
    cfg: FinetuneConfig,
    *,
    num_classes: int,
    seed: int,
    storage_path: str,
    name: str,
) -> dict:
    """Run fine-tuning on Ray Train (Ray must be initialised); returns per-epoch top-1 and the final figure."""
    subset = class_balanced_subset(train.labels, train.keys, cfg.label_fraction, seed)
    data = {
        "train_x": np.ascontiguousarray(train.pixels[subset]),
        "train_y": train.labels[subset],
        "test_x": test.pixels,
        "test_y": test.labels,
    }
    state = {k: v.detach().cpu() for k, v in encoder.model.state_dict().items()}
    use_gpu = cluster_has_gpu() if cfg.use_gpu is None else cfg.use_gpu
    job = FinetuneJob(
        cfg=cfg, data=ray.put(data), state=ray.put(state),
        encoder={"timm_kwargs": encoder.config["timm_kwargs"], "mean": list(encoder.mean), "std": list(encoder.std),
                 "img_size": encoder.img_size, "encoder_id": encoder.encoder_id},
        classes=list(train.classes), num_classes=num_classes, seed=seed, use_gpu=use_gpu,
    )
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{np.random.default_rng().integers(1 << 30):08x}"
    t0 = time.perf_counter()
    result = fit(train_loop_per_worker, job, FitSpec(
        "fine-tuning", run_name, storage_path, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=use_gpu, keep_checkpoints=1, max_failures=cfg.max_failures))
    if not result.metrics or "history" not in result.metrics:
        raise RuntimeError(f"fine-tuning run {run_name} reported no metrics")
    history = result.metrics["history"]
    return {
        "top1": history[-1]["top1"],
        "best_top1": max(h["top1"] for h in history),
        "epochs": history,
        "label_fraction": cfg.label_fraction,
        "n_train": int(len(subset)),
        "n_test": int(len(test)),
        "workers": cfg.workers,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": time.perf_counter() - t0,
    }
