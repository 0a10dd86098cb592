"""``run_pretrain``: the pretraining job's driver: check the inputs, run Ray Train, export the encoder.

The per-worker training loop is ``pretrain.loop.train_loop_per_worker``. Everything a run writes lives
under ``<out>/<run_name>/``: Ray Train's ``checkpoint_<step>/`` directories (a rerun with the same
``run_name`` and ``out`` resumes from the newest), ``metrics.jsonl``, ``config.yaml`` and, at the end,
``encoder/`` (the timm export that evaluation reads).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import storage
from pipeline.config import ConfigError, save_config, to_dict
from pipeline.token_cache import check_cache, shard_urls
from pretrain.config import PretrainConfig
from pretrain.data import AUGMENTS
from pretrain.flops import train_flops_per_image
from pretrain.masking import make_masker, num_masked_for


@dataclass
class RunPlan:
    """What the driver worked out before training; the workers read it instead of re-checking."""

    urls: list[str]
    samples: int
    steps_per_epoch: int
    total_steps: int
    end_step: int
    warmup_steps: int
    per_worker_batch: int
    num_masked: int
    grid: list[int]
    vocab_size: int | None
    tokenizer_id: str | None
    tok_input_size: int | None
    train_flops_per_image: int  # model FLOPs of one image's forward + backward (pretrain.flops)
    run_dir: str
    storage_path: str
    shard_sha256: dict[str, str] = field(default_factory=dict)  # url -> the manifest's sha256 (data.verify_shards)


@dataclass
class PretrainResult:
    checkpoint_dir: str
    encoder_dir: str
    metrics: dict[str, Any]


def _load_tokenizer(path: str):
    from tokenizer.checkpoint import load_tokenizer

    return load_tokenizer(path)


def _storage_path(out: str) -> str:
    return out if storage.is_uri(out) else str(Path(out).expanduser().resolve())


def plan_run(cfg: PretrainConfig) -> RunPlan:
    """Validate the config against the cache and tokenizer; raise ``ConfigError``/``CacheError``."""
    d = cfg.data
    if not d.tokens:
        raise ConfigError("data.tokens: the token cache directory (tokens/<tokenizer_id>) is required")
    if d.augment not in AUGMENTS:
        raise ConfigError(f"data.augment must be one of {list(AUGMENTS)}, got {d.augment!r}")
    if d.augment != "views" and cfg.target == "tokens":
        raise ConfigError("data.augment=random_resized_crop needs target tokens-online or pixels "
                          "(cached tokens exist only for the cached views)")
    if cfg.target == "tokens-online" and not d.tokenizer:
        raise ConfigError("target tokens-online needs data.tokenizer (the tokenizer runs in the training step)")
    if len(d.mean) != 3 or len(d.std) != 3:
        raise ConfigError("data.mean and data.std need 3 values")
    tok = _load_tokenizer(d.tokenizer) if d.tokenizer else None
    info, rows = check_cache(d.tokens, tok.tokenizer_id if tok is not None else None)
    if d.img_size % cfg.model.patch:
        raise ConfigError(f"data.img_size {d.img_size} is not a multiple of model.patch {cfg.model.patch}")
    grid = [d.img_size // cfg.model.patch] * 2
    vocab = None
    if cfg.target == "tokens":
        if info.grid != grid:
            raise ConfigError(
                f"the cache's token grid {info.grid} does not match the model's patch grid {grid} "
                f"(data.img_size {d.img_size} / model.patch {cfg.model.patch})")
        vocab = info.vocab_size
    elif cfg.target == "tokens-online":
        if list(tok.grid) != grid:
            raise ConfigError(f"the tokenizer's grid {list(tok.grid)} does not match the model's patch grid {grid}")
        vocab = int(tok.vocab_size)
    if cfg.workers < 1 or d.batch_size % cfg.workers:
        raise ConfigError(f"data.batch_size {d.batch_size} must split evenly over {cfg.workers} workers")
    samples = sum(int(r["samples"]) for r in rows)
    steps_per_epoch = samples // d.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size {d.batch_size} is larger than the cache ({samples} samples)")
    total = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    end = min(total, cfg.stop_at) if cfg.stop_at else total
    warmup = cfg.optim.warmup_steps or int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    try:
        num_masked = num_masked_for(tuple(grid), cfg.mask.ratio, cfg.mask.num_masked)
        make_masker(cfg.mask.mode, tuple(grid), num_masked, min_block=cfg.mask.min_block,
                    max_block=cfg.mask.max_block, min_aspect=cfg.mask.min_aspect)  # validates
    except ValueError as e:  # a config mistake: one line, not a traceback
        raise ConfigError(str(e)) from None
    storage_path = _storage_path(cfg.out)
    out_dim = 3 * cfg.model.patch**2 if cfg.target == "pixels" else vocab
    return RunPlan(
        urls=shard_urls(d.tokens, rows), samples=samples, steps_per_epoch=steps_per_epoch, total_steps=total,
        end_step=end, warmup_steps=min(warmup, total), per_worker_batch=d.batch_size // cfg.workers,
        num_masked=num_masked, grid=grid, vocab_size=vocab,
        tokenizer_id=tok.tokenizer_id if tok is not None else info.tokenizer_id,
        tok_input_size=int(tok.input_size) if tok is not None else None,
        train_flops_per_image=train_flops_per_image(cfg.model, d.img_size, out_dim, num_masked),
        run_dir=storage.join(storage_path, cfg.run_name), storage_path=storage_path,
        shard_sha256=dict(zip(shard_urls(d.tokens, rows), (r["sha256"] for r in rows))),
    )


def run_pretrain(cfg: PretrainConfig, address: str | None = None, log: Callable[[str], None] = print,
                 num_cpus: int | None = None) -> PretrainResult:
    """Train (or resume) under ``<out>/<run_name>``, export the encoder, return the paths and metrics."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.ray_context import ray_session, require_gpu
    from pretrain.checkpoint import latest_checkpoint
    from pretrain.export import export_encoder
    from pretrain.loop import train_loop_per_worker

    plan = plan_run(cfg)
    log(f"pretrain: {cfg.target} target, {plan.samples} samples in {len(plan.urls)} shards, "
        f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch, batch {cfg.data.batch_size} = "
        f"{cfg.workers}x{plan.per_worker_batch}), {plan.num_masked}/{plan.grid[0] * plan.grid[1]} patches masked "
        f"({cfg.mask.mode}) -> {plan.run_dir}")
    start = time.perf_counter()
    with ray_session(address, num_cpus=num_cpus):
        if cfg.use_gpu:
            require_gpu(log)
        resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "plan": dataclasses.asdict(plan)},
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=cfg.run_name,
                storage_path=plan.storage_path,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                logging_config=LoggingConfig(log_level="WARNING"),  # the progress line says what matters
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is not None:
        ckpt_dir = result.checkpoint.path
    else:  # nothing left to train (a rerun of a finished run): its newest checkpoint
        ckpt_dir = str(latest_checkpoint(plan.run_dir))
    encoder_dir = storage.join(plan.run_dir, "encoder")
    export_encoder(ckpt_dir, encoder_dir)
    if not storage.is_uri(plan.run_dir):
        save_config(cfg, plan.run_dir, "config.yaml")
    metrics = dict(result.return_value or {})
    metrics["wall_s"] = round(time.perf_counter() - start, 1)
    log(f"pretrain: checkpoint {ckpt_dir}; encoder exported to {encoder_dir} ({metrics['wall_s']:.0f} s)")
    return PretrainResult(str(ckpt_dir), str(encoder_dir), metrics)


__all__ = ["PretrainResult", "RunPlan", "plan_run", "run_pretrain"]
