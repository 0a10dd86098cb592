"""``run_pretrain``: the pretraining job's driver: check the inputs once, run the harness, export the encoder.

Validation is ``pretrain.plan.plan_run``; the per-worker loop is ``pretrain.loop.train_loop_per_worker``,
run by ``pipeline.train_harness.fit``. Everything a run writes lives under ``<out>/<run_name>/`` (a local
path or a URI): ``config.yaml`` (written first), Ray Train's ``checkpoint_<step>/`` directories (a rerun
with the same ``run_name`` and ``out`` resumes from the newest; a killed worker restarts from it inside
the run, up to ``max_failures`` times), ``metrics.jsonl``, ``tensorboard/`` and, at the end, ``encoder/``
(the timm export that evaluation reads). A rerun of a finished run starts no Ray: it names the newest
checkpoint, says the run is done and exports it again.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import Any, Callable

from pipeline import storage
from pipeline.config import save_config
from pipeline.ray_context import ray_session, require_gpu
from pipeline.train_harness import FitSpec, fit
from pretrain.checkpoint import latest_checkpoint, read_metrics, read_state
from pretrain.config import PretrainConfig
from pretrain.export import export_encoder
from pretrain.loop import train_loop_per_worker
from pretrain.plan import RunPlan, plan_run


@dataclass
class PretrainResult:
    checkpoint_dir: str
    encoder_dir: str
    metrics: dict[str, Any]


def finished_checkpoint(plan: RunPlan) -> tuple[str, int] | None:
    """(newest checkpoint, its step) when the run under ``plan.run_dir`` already reached ``plan.end_step``."""
    try:
        ckpt = latest_checkpoint(plan.run_dir)
    except FileNotFoundError:
        return None
    step = int(read_state(ckpt).get("step", -1))
    return (ckpt, step) if step >= plan.end_step else None


def _done_metrics(plan: RunPlan, step: int) -> dict[str, Any]:
    """What a finished run's rerun reports: no steps taken here, the last logged step's figures."""
    last = [r for r in read_metrics(plan.run_dir) if r.get("kind") == "step" and r.get("step", 0) <= step]
    figures = {k: v for k, v in (last[-1] if last else {}).items() if k in ("loss", "acc", "lr", "images_per_s")}
    return {"start_step": step, "step": step, "total_steps": plan.total_steps, "already_done": True, **figures}


def run_pretrain(cfg: PretrainConfig, address: str | None = None, log: Callable[[str], None] = print,
                 num_cpus: int | None = None) -> PretrainResult:
    """Train (or resume) under ``<out>/<run_name>``, export the encoder, return the paths and metrics."""
    plan = plan_run(cfg)
    log(f"pretrain: {cfg.target} target, {plan.samples} samples in {len(plan.urls)} shards, "
        f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch, batch {cfg.data.batch_size} = "
        f"{cfg.workers}x{plan.per_worker_batch}), {plan.num_masked}/{plan.grid[0] * plan.grid[1]} patches masked "
        f"({cfg.mask.mode}) -> {plan.run_dir}")
    for note in plan.notes:
        log(f"pretrain: {note}")
    start = time.perf_counter()
    encoder_dir = storage.join(plan.run_dir, "encoder")
    done = finished_checkpoint(plan)
    if done is not None:  # nothing left to train: no Ray, no workers
        ckpt_dir, step = done
        log(f"pretrain: {plan.run_dir} is done (step {step}/{plan.end_step}, newest checkpoint {ckpt_dir}); "
            f"nothing to train, exporting it again")
        export_encoder(ckpt_dir, encoder_dir)
        metrics = _done_metrics(plan, step)
    else:
        save_config(cfg, plan.run_dir, "config.yaml")  # before training: a killed run says what it was
        spec = FitSpec("pretraining", cfg.run_name, plan.storage_path, workers=cfg.workers,
                       cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, keep_checkpoints=cfg.keep_checkpoints,
                       max_failures=cfg.max_failures)
        with ray_session(address, num_cpus=num_cpus):
            if cfg.use_gpu:
                require_gpu(log)
            result = fit(train_loop_per_worker, plan, spec)
        if result.checkpoint is not None:
            # Ray gives the path inside its storage filesystem (no s3:// scheme): name it under the run dir,
            # and let Ray materialise it locally for the export (the directory itself for a local run dir)
            ckpt_dir = storage.join(plan.run_dir, posixpath.basename(result.checkpoint.path.rstrip("/")))
            with result.checkpoint.as_directory() as local_ckpt:
                export_encoder(local_ckpt, encoder_dir, source=ckpt_dir)
        else:  # a run that reported no checkpoint in this attempt: the run directory's newest
            ckpt_dir = latest_checkpoint(plan.run_dir)
            export_encoder(ckpt_dir, encoder_dir)
        metrics = dict(result.return_value or {})
    metrics["wall_s"] = round(time.perf_counter() - start, 1)
    log(f"pretrain: checkpoint {ckpt_dir}; encoder exported to {encoder_dir} ({metrics['wall_s']:.0f} s)")
    return PretrainResult(str(ckpt_dir), str(encoder_dir), metrics)


__all__ = ["PretrainResult", "RunPlan", "finished_checkpoint", "plan_run", "run_pretrain"]
