"""Fine-tuning: the whole encoder plus a linear head, on Ray Train (``TorchTrainer``).

BEiT's recipe, scaled down: layer-wise learning-rate decay (block ``i`` of ``depth`` gets
``lr * decay^(depth - i)``, the patch embedding, [CLS] and position embeddings
``lr * decay^(depth + 1)``, the head and final norms ``lr``), stochastic depth (drop path), AdamW
without weight decay on biases, norms and embeddings, linear warmup then cosine decay per step,
label smoothing, random-resized-crop + flip augmentation. Top-1 on the test split after every
epoch. ``label_fraction`` trains on a deterministic, class-balanced subset of the training labels
(e.g. 1% or 10%), where pretraining pays most.

The driver puts the decoded images and the encoder weights in the object store; every worker builds
the model, takes its slice of each global batch (all ranks run the same number of steps) and its
slice of the test set, and the counts are all-reduced.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_STEM = ("cls_token", "pos_embed", "patch_embed", "mask_token", "rel_pos_bias")


# ------------------------------------------------------------------------------ layer-wise lr decay


def layer_id(name: str, depth: int) -> int:
    """0 for the stem (patch embedding, [CLS], position embeddings), i+1 for ``blocks.i``, depth+1 for the rest."""
    m = re.match(r"^blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if name.split(".")[0] in _STEM:
        return 0
    return depth + 1


def lr_scale(name: str, depth: int, layer_decay: float) -> float:
    return float(layer_decay ** (depth + 1 - layer_id(name, depth)))


def param_groups_lrd(
    model: torch.nn.Module,
    base_lr: float,
    *,
    weight_decay: float = 0.05,
    layer_decay: float = 0.65,
) -> list[dict[str, Any]]:
    """Optimizer groups, one per (layer, decay / no decay), each with its ``lr`` and ``lr_scale``.

    No weight decay on 1-d parameters (biases, norms, layer scales) and on the model's
    ``no_weight_decay()`` names (position embeddings, [CLS], relative position bias tables).
    """
    depth = len(model.blocks)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name, depth)
        key = (lid, no_decay)
        if key not in groups:
            scale = float(layer_decay ** (depth + 1 - lid))
            groups[key] = {
                "params": [],
                "param_names": [],
                "layer": lid,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine from ``base_lr`` down to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    rest = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / rest)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    torch.manual_seed(seed)
    model = beit.Beit(**kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"encoder weights do not fit the classifier: {bad[:5]}")
    return model


def _train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["threads"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = ray.get(config["data"])
    state = ray.get(config["state"])
    enc = config["encoder"]
    device = ray.train.torch.get_device()
    model = build_classifier(enc["timm_kwargs"], state, config["num_classes"], config["drop_path"], config["seed"])
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    groups = param_groups_lrd(core, config["lr"], weight_decay=config["weight_decay"], layer_decay=config["layer_decay"])
    opt = torch.optim.AdamW(groups, lr=config["lr"], betas=(0.9, 0.999))
    mean = torch.tensor(enc["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(enc["std"], device=device).view(1, 3, 1, 1)
    use_amp = device.type == "cuda"

    def prep(pixels: np.ndarray, gen: torch.Generator | None) -> torch.Tensor:
        x = torch.from_numpy(np.array(pixels)).to(device).float().div_(255.0)  # a copy: object-store arrays are read-only
        if gen is not None:
            x = random_resized_crop_flip(x, gen)
        return (x - mean) / std

    train_x, train_y = data["train_x"], torch.from_numpy(np.array(data["train_y"]))
    test_x, test_y = data["test_x"][rank::world], torch.from_numpy(np.array(data["test_y"][rank::world]))
    n, bs = len(train_x), int(config["batch_size"])
    global_batch = bs * world
    steps_per_epoch = max(1, math.ceil(n / global_batch))
    total = steps_per_epoch * config["epochs"]
    warmup = int(round(config["warmup_epochs"] * steps_per_epoch))
    aug_gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    history: list[dict] = []
    step = 0
    for epoch in range(config["epochs"]):
        t0 = time.perf_counter()
        model.train()
        order = np.resize(np.random.default_rng(config["seed"] + epoch).permutation(n), steps_per_epoch * global_batch)
        loss_sum, loss_n = torch.zeros((), dtype=torch.float64), 0
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * global_batch + rank * bs : s * global_batch + (rank + 1) * bs])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, config["lr"], config["min_lr"]) * g["lr_scale"]
            x = prep(train_x[idx], aug_gen if config["augment"] else None)
            y = train_y[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(model(x), y, label_smoothing=config["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip_grad"])
            opt.step()
            loss_sum += float(loss.detach())
            loss_n += 1
            step += 1
        model.eval()
        correct = torch.zeros((), dtype=torch.float64)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            for start in range(0, len(test_x), 256):
                logits = model(prep(test_x[start : start + 256], None))
                correct += (logits.argmax(1).cpu() == test_y[start : start + 256]).sum().double()
        counts = torch.stack([correct, torch.tensor(float(len(test_x)), dtype=torch.float64), loss_sum,
                              torch.tensor(float(loss_n), dtype=torch.float64)])
        if world > 1 and torch.distributed.is_initialized():
            counts = counts.to(device)  # NCCL reduces CUDA tensors only
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        history.append({
            "epoch": epoch + 1,
            "train_loss": float(counts[2] / max(counts[3], 1)),
            "top1": float(counts[0] / max(counts[1], 1)),
            "lr": float(lr_at(step - 1, total, warmup, config["lr"], config["min_lr"])),
            "seconds": time.perf_counter() - t0,
        })
        if rank == 0:
            h = history[-1]
            print(f"fine-tune epoch {h['epoch']}/{config['epochs']}: train loss {h['train_loss']:.4f}, "
                  f"top-1 {h['top1']:.1%} ({h['seconds']:.1f}s)", flush=True)
        metrics = {"epoch": epoch + 1, "top1": history[-1]["top1"], "history": list(history)}
        if epoch + 1 < config["epochs"]:
            ray.train.report(metrics)
            continue
        # Ray Train V2 keeps metrics only with a checkpoint: the last epoch reports one (rank 0), holding
        # the history and, unless asked not to, the fine-tuned classifier (timm Beit, with its head).
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                Path(tmp, "history.json").write_text(json.dumps(history, indent=1))
                if config["keep_model"]:
                    from safetensors.torch import save_file

                    save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()},
                              str(Path(tmp, "model.safetensors")))
                    kwargs = {**enc["timm_kwargs"], "num_classes": config["num_classes"], "drop_path_rate": 0.0}
                    Path(tmp, "config.json").write_text(json.dumps({
                        "architecture": "beit", "timm_kwargs": kwargs, "img_size": enc["img_size"],
                        "mean": enc["mean"], "std": enc["std"], "classes": config["classes"],
                        "source_encoder": enc["encoder_id"],
                    }, indent=1))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def finetune(
    encoder,  # eval.features.Encoder
    train,  # eval.features.LabelledImages
    test,
    cfg,  # eval.eval_config.FinetuneConfig
    *,
    num_classes: int,
    seed: int,
    storage_path: str,
    name: str,
) -> dict:
    """Run fine-tuning on Ray Train (Ray must be initialised); returns per-epoch top-1 and the final figure."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_context import cluster_has_gpu

    subset = class_balanced_subset(train.labels, train.keys, cfg.label_fraction, seed)
    data = {
        "train_x": np.ascontiguousarray(train.pixels[subset]),
        "train_y": train.labels[subset],
        "test_x": test.pixels,
        "test_y": test.labels,
    }
    state = {k: v.detach().cpu() for k, v in encoder.model.state_dict().items()}
    use_gpu = cluster_has_gpu() if cfg.use_gpu is None else cfg.use_gpu
    config = {
        "data": ray.put(data),
        "state": ray.put(state),
        "encoder": {
            "timm_kwargs": encoder.config["timm_kwargs"], "mean": list(encoder.mean), "std": list(encoder.std),
            "img_size": encoder.img_size, "encoder_id": encoder.encoder_id,
        },
        "classes": list(train.classes),
        "keep_model": cfg.keep_model,
        "num_classes": num_classes,
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "min_lr": cfg.min_lr,
        "layer_decay": cfg.layer_decay,
        "drop_path": cfg.drop_path,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size,
        "warmup_epochs": cfg.warmup_epochs,
        "label_smoothing": cfg.label_smoothing,
        "clip_grad": cfg.clip_grad,
        "augment": cfg.augment,
        "threads": cfg.cpus_per_worker,
        "seed": seed,
    }
    scaling = ScalingConfig(
        num_workers=cfg.workers,
        use_gpu=use_gpu,
        resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker},
    )
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{np.random.default_rng().integers(1 << 30):08x}"
    t0 = time.perf_counter()
    result = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=scaling,
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             logging_config=LoggingConfig(log_level="WARNING")),
    ).fit()
    if result.error:
        raise result.error
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
