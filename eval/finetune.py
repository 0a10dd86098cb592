"""Fine-tuning: the whole encoder plus a linear head, a training loop on the harness (``pipeline.train_harness``).

BEiT's recipe, scaled down: layer-wise learning-rate decay (block ``i`` of ``depth`` gets
``lr * decay^(depth - i)``, the patch embedding, [CLS] and position embeddings
``lr * decay^(depth + 1)``, the head and final norms ``lr``: ``pipeline.train_worker.param_groups``),
stochastic depth (drop path), AdamW without weight decay on biases, norms and embeddings, linear warmup
then cosine decay over *steps*, label smoothing, random-resized-crop + flip augmentation.

The schedule is in steps (``plan_steps``): ``steps`` when set, else ``epochs`` passes over the
labelled subset but at least ``min_steps``, so 1% of the labels (a few batches an epoch) still trains
to convergence. Every round (an epoch, or ``steps / evals`` when that is longer) the model is scored on
the validation split carved from the labelled subset (``eval.finetune_data``) and the best round is
kept; the test set is scored once, at the end, with the selected weights (the last round's when
``val_fraction`` is 0). Nothing is chosen on the test set.

Workers stream their share of the selected keys from the source's partitions
(``eval.stream.LabelledStream``): the driver holds keys and labels, never images. Every round reports
a checkpoint (the classifier, the selected one, AdamW, the RNG state, the history), so a killed
worker restarts inside the run from the newest finished round; the last round's checkpoint holds the
history and the selected classifier.
"""

from __future__ import annotations

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
from eval.finetune_data import FinetuneData
from eval.stream import LabelledStream
from pipeline.ray_context import cluster_has_gpu
from pipeline.train_harness import FitSpec, fit
from pipeline.tensors import normalize
from pipeline.train_worker import (WorkerEnv, apply_lr, derive_seed, load_torch, load_weights,
                                   param_groups, report, restored, save_json, save_torch, save_weights,
                                   seed_everything, warmup_cosine, worker_env)


# -------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total: int  # optimizer steps
    warmup: int
    interval: int  # steps per round (validation + checkpoint)

    @property
    def rounds(self) -> int:
        return math.ceil(self.total / self.interval)

    def steps_in(self, r: int) -> int:
        return min(self.total, (r + 1) * self.interval) - r * self.interval


def plan_steps(n_train: int, world: int, cfg: FinetuneConfig) -> StepPlan:
    """Steps per epoch of ``n_train`` items at ``batch_size x world``; total = ``steps``, else
    ``max(epochs x steps_per_epoch, min_steps)``; a round per epoch, at most ``evals`` of them."""
    per_epoch = max(1, math.ceil(n_train / (int(cfg.batch_size) * max(1, world))))
    total = int(cfg.steps) if cfg.steps else max(cfg.epochs * per_epoch, int(cfg.min_steps))
    warmup = int(cfg.warmup_steps) if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * per_epoch))
    interval = max(min(per_epoch, total), math.ceil(total / cfg.evals))
    return StepPlan(per_epoch, total, min(warmup, total), interval)


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
    """What the driver hands every worker (keys and encoder weights as object-store references)."""

    cfg: FinetuneConfig
    data: Any  # ObjectRef of a FinetuneData (keys and labels, no images)
    state: Any  # ObjectRef of the encoder's state dict
    encoder: dict[str, Any]  # timm_kwargs, mean, std, img_size, encoder_id
    num_classes: int
    seed: int
    use_gpu: bool


def _prep(pixels: torch.Tensor, env: WorkerEnv, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return normalize(pixels.to(env.device), mean, std)


def _score(model: torch.nn.Module, env: WorkerEnv, stream: LabelledStream, mean, std,
           mapping: torch.Tensor | None = None) -> torch.Tensor:
    """[correct, count] over this rank's share of ``stream`` (float64, to be all-reduced). Pass the
    unwrapped model: ranks may hold different batch counts, and a DDP forward is a collective."""
    model.eval()
    out = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), env.autocast():
        for batch in stream:
            y = batch["label"] if mapping is None else mapping[batch["label"]]
            out[0] += (model(_prep(batch["image"], env, mean, std)).argmax(1).cpu() == y).sum().double()
            out[1] += len(y)
    return out


@dataclass
class _State:
    """What a round boundary carries over: the history, the selected round and its weights."""

    history: list[dict]
    best: dict | None = None  # {"round", "step", "epoch", "val_top1"}
    best_weights: dict[str, torch.Tensor] | None = None


def train_loop_per_worker(job: FinetuneJob) -> None:
    cfg, enc = job.cfg, job.encoder
    env = worker_env(cpus=cfg.cpus_per_worker, use_gpu=job.use_gpu)
    data: FinetuneData = ray.get(job.data)
    core = build_classifier(enc["timm_kwargs"], ray.get(job.state), job.num_classes, cfg.drop_path, job.seed)
    model = env.wrap(core)  # DDP when world > 1
    opt = torch.optim.AdamW(param_groups(core, cfg.weight_decay, layer_decay=cfg.layer_decay, base_lr=cfg.lr),
                            lr=cfg.lr, betas=(0.9, 0.999))
    mean = torch.tensor(enc["mean"], device=env.device)
    std = torch.tensor(enc["std"], device=env.device)
    plan = plan_steps(len(data.train_keys), env.world, cfg)
    size, bs = int(enc["img_size"]), int(cfg.batch_size)
    stream = dict(rank=env.rank, world_size=env.world)
    train = LabelledStream(data.train_spec, size, batch_size=bs, augment=cfg.augment, seed=derive_seed(job.seed, 1),
                           keys=data.train_keys, **stream)
    val = (LabelledStream(data.train_spec, size, batch_size=bs, keys=data.val_keys, cycle=False, **stream)
           if data.val_keys else None)
    start, st = _resume(core, opt, env)
    step = sum(plan.steps_in(r) for r in range(start))
    for r in range(start, plan.rounds):
        t0 = time.perf_counter()
        model.train()
        train.set_epoch(r)
        train.batches_per_epoch = plan.steps_in(r)
        loss_sum, loss_n = torch.zeros((), dtype=torch.float64), 0
        for batch in train:
            apply_lr(opt, warmup_cosine(step, plan.total, plan.warmup, cfg.lr, cfg.min_lr))  # x each group's lr_scale
            x, y = _prep(batch["image"], env, mean, std), batch["label"].to(env.device)
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
        scored = _score(core, env, val, mean, std) if val is not None else torch.zeros(2, dtype=torch.float64)
        counts = env.all_reduce(torch.cat([scored, torch.stack([loss_sum, torch.tensor(float(loss_n), dtype=torch.float64)])]))
        h = {
            "round": r + 1, "step": step, "epoch": round(step / plan.steps_per_epoch, 3),
            "train_loss": float(counts[2] / max(counts[3], 1)),
            "val_top1": float(counts[0] / counts[1]) if counts[1] > 0 else None,
            "lr": float(warmup_cosine(step - 1, plan.total, plan.warmup, cfg.lr, cfg.min_lr)),
            "seconds": time.perf_counter() - t0,
        }
        st.history.append(h)
        # ties go to the later round: with a small validation split, the longer-trained weights
        if h["val_top1"] is not None and (st.best is None or h["val_top1"] >= st.best["val_top1"]):
            st.best = {k: h[k] for k in ("round", "step", "epoch", "val_top1")}
            st.best_weights = {k: v.detach().clone() for k, v in core.state_dict().items()}
        val_txt = f", val top-1 {h['val_top1']:.1%} ({int(counts[1])})" if h["val_top1"] is not None else ""
        env.say(f"fine-tune step {step}/{plan.total} (epoch {h['epoch']:g}): train loss {h['train_loss']:.4f}"
                f"{val_txt} ({h['seconds']:.1f}s)")
        if r + 1 < plan.rounds:
            # Ray Train V2 keeps metrics only with a checkpoint: every round reports one
            report({"round": r + 1}, write=_resume_writer(core, opt, st))
            continue
        if st.best_weights is not None:
            core.load_state_dict(st.best_weights)
        mapping = torch.tensor(data.test_mapping) if data.test_mapping is not None else None
        test = LabelledStream(data.test_spec, size, batch_size=bs, keys=data.test_keys, cycle=False, **stream)
        tc = env.all_reduce(_score(core, env, test, mean, std, mapping))
        selected = st.best or {k: h[k] for k in ("round", "step", "epoch", "val_top1")}
        result = {"top1": float(tc[0] / max(tc[1], 1)), "n_test_scored": int(tc[1]), "selected": selected,
                  "history": list(st.history), "steps": plan.total, "steps_per_epoch": plan.steps_per_epoch}
        env.say(f"fine-tune: test top-1 {result['top1']:.1%} with the weights of step {selected['step']} "
                f"(selected on {data.selected_on})")
        report(result, write=_final_writer(job, core, result))


def _resume_writer(core: torch.nn.Module, opt: torch.optim.Optimizer, st: _State):
    """A mid-run checkpoint: the classifier, the selected weights, AdamW, the RNG state (drop path), the history."""
    def write(d: Path) -> None:
        save_weights(core, d / "model.safetensors")
        if st.best_weights is not None:
            save_weights(st.best_weights, d / "selected.safetensors")
        save_torch(opt.state_dict(), d / "optimizer.pt")
        save_torch({"torch": torch.get_rng_state()}, d / "rng.pt")
        save_json(st.history, d / "history.json")
        save_json({"rounds": len(st.history), "best": st.best}, d / "state.json")
    return write


def _final_writer(job: FinetuneJob, core: torch.nn.Module, result: dict):
    """The last round's checkpoint: the history, the selection and, unless asked not to, the selected
    fine-tuned classifier (timm Beit, with its head)."""
    def write(d: Path) -> None:
        save_json(result["history"], d / "history.json")
        save_json({k: result[k] for k in ("top1", "selected", "steps")}, d / "result.json")
        if job.cfg.keep_model:
            save_weights(core, d / "model.safetensors")
            kwargs = {**job.encoder["timm_kwargs"], "num_classes": job.num_classes, "drop_path_rate": 0.0}
            save_json({
                "architecture": "beit", "timm_kwargs": kwargs, "img_size": job.encoder["img_size"],
                "mean": job.encoder["mean"], "std": job.encoder["std"], "classes": job.encoder["classes"],
                "source_encoder": job.encoder["encoder_id"],
            }, d / "config.json")
    return write


def _resume(core: torch.nn.Module, opt: torch.optim.Optimizer, env: WorkerEnv) -> tuple[int, _State]:
    """(first round, state) from this run's newest mid-run checkpoint (a restarted worker), else (0, empty)."""
    with restored() as d:
        if d is None or not (d / "state.json").is_file():
            return 0, _State([])
        core.load_state_dict(load_weights(d / "model.safetensors", env.device), strict=True)
        opt.load_state_dict(load_torch(d / "optimizer.pt", env.device))
        rng = load_torch(d / "rng.pt")
        meta = json.loads((d / "state.json").read_text())
        best_w = load_weights(d / "selected.safetensors", env.device) if (d / "selected.safetensors").is_file() else None
        st = _State(json.loads((d / "history.json").read_text()), meta["best"], best_w)
    torch.set_rng_state(rng["torch"])
    env.say(f"fine-tune: resuming after round {len(st.history)}")
    return len(st.history), st


def finetune(
    encoder,  # eval.features.Encoder
    data: FinetuneData,
    cfg: FinetuneConfig,
    *,
    seed: int,
    storage_path: str,
    name: str,
) -> dict:
    """Run fine-tuning on Ray Train (Ray must be initialised): train on ``data``'s train keys, select on
    its validation keys (or take the last round), score the test keys once; returns the figures."""
    state = {k: v.detach().cpu() for k, v in encoder.model.state_dict().items()}
    use_gpu = cluster_has_gpu() if cfg.use_gpu is None else cfg.use_gpu
    num_classes = len(data.classes)
    job = FinetuneJob(
        cfg=cfg, data=ray.put(data), state=ray.put(state),
        encoder={"timm_kwargs": encoder.config["timm_kwargs"], "mean": list(encoder.mean), "std": list(encoder.std),
                 "img_size": encoder.img_size, "encoder_id": encoder.encoder_id, "classes": list(data.classes)},
        num_classes=num_classes, seed=seed, use_gpu=use_gpu,
    )
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{np.random.default_rng().integers(1 << 30):08x}"
    t0 = time.perf_counter()
    result = fit(train_loop_per_worker, job, FitSpec(
        "fine-tuning", run_name, storage_path, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=use_gpu, keep_checkpoints=1, max_failures=cfg.max_failures))
    if not result.metrics or "history" not in result.metrics:
        raise RuntimeError(f"fine-tuning run {run_name} reported no metrics")
    m = result.metrics
    return {
        "top1": m["top1"],
        "selected_on": data.selected_on,
        "selected": m["selected"],
        "last_val_top1": m["history"][-1]["val_top1"],
        "history": m["history"],
        "steps": m["steps"],
        "steps_per_epoch": m["steps_per_epoch"],
        "label_fraction": cfg.label_fraction,
        "n_labelled": len(data.train_keys) + len(data.val_keys),
        "n_train": len(data.train_keys),
        "n_val": len(data.val_keys),
        "n_test": m["n_test_scored"],
        "workers": cfg.workers,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": time.perf_counter() - t0,
    }
