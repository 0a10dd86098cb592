"""``train_tokenizer(cfg)``: the tokenizer-training driver; runs a Ray Train ``TorchTrainer`` job.

1. returns at once if ``cfg.out`` already holds a tokenizer trained from the same config and source
   (``train.json`` records the training fingerprint and the tokenizer id);
2. otherwise plans the held-out split (``tokenizer.train_config.make_plan``) and runs
   ``tokenizer.train_loop.train_loop_per_worker`` on ``num_workers`` Ray Train workers (DDP: gloo on
   CPU, nccl on GPU); a rerun with the same run name resumes from the run's latest checkpoint;
3. saves the tokenizer to ``cfg.out`` (``config.json`` + ``model.safetensors``), the resolved config
   (``config.yaml``), ``train.json`` and, for the dVAE, ``reconstructions.png``; prints the
   codebook usage on held-out images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import ConfigError, to_dict
from tokenizer.train_config import Plan, TokenizerTrainConfig, make_plan, teacher_for, training_fingerprint
from tokenizer.train_loop import train_loop_per_worker


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
    from tokenizer.checkpoint import tokenizer_id

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
    from pipeline.errors import StageError
    from pipeline.ray_context import ray_session, require_gpu
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
        teacher_for(cfg)
    plan = make_plan(cfg, source)
    storage_path = _local_or_uri(cfg.storage_path) if cfg.storage_path else storage.join(_parent(out), "ray")
    run_name = cfg.run_name or f"tokenizer-{cfg.model.kind}-{fingerprint}"
    log(f"tokenizer: training {cfg.model.kind} on {source.describe()}; run {run_name!r} under {storage_path}")
    start = time.perf_counter()
    with ray_session(address):
        if cfg.use_gpu and cfg.num_workers:
            require_gpu(log)
        result = _fit(cfg, plan, fingerprint, run_name, storage_path)
    seconds = time.perf_counter() - start

    info = result.return_value or {}
    if "state" in info:
        from tokenizer.checkpoint import build_tokenizer

        tok = build_tokenizer(cfg.model)
        tok.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in info["state"].items()})
        tok.mark_loaded()
    elif result.checkpoint is not None:
        from tokenizer.checkpoint import load_tokenizer

        with result.checkpoint.as_directory() as d:
            tok = load_tokenizer(d)
    else:
        raise StageError(f"tokenizer run {run_name!r} finished without a checkpoint or weights")
    if not info:
        raise StageError(f"tokenizer run {run_name!r} returned no summary from rank 0")

    from tokenizer.checkpoint import save_tokenizer

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

    from pipeline.errors import StageError

    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
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
