"""``train_tokenizer(cfg)``: the tokenizer-training driver; runs a Ray Train ``TorchTrainer`` job.

1. returns at once if ``cfg.out`` already holds a tokenizer trained from the same config and source
   (``train.json`` records the training fingerprint and the tokenizer id);
2. otherwise plans the held-out split (``tokenizer.train_config.make_plan``) and runs
   ``tokenizer.train_loop.train_loop_per_worker`` on ``num_workers`` Ray Train workers through
   ``pipeline.train_harness.fit`` (DDP: gloo on CPU, nccl on GPU); a rerun with the same run name
   resumes from the run's latest checkpoint, and a killed worker restarts from it inside the run
   (up to ``max_failures`` times);
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

from pipeline import storage
from pipeline.config import ConfigError, dump_config, to_dict
from pipeline.errors import StageError
from pipeline.images import encode_png
from pipeline.ray_context import ray_session, require_gpu
from pipeline.sources import open_source
from pipeline.train_harness import FitSpec, fit
from tokenizer.checkpoint import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_id
from tokenizer.train_config import TokenizerTrainConfig, make_plan, teacher_for, training_fingerprint
from tokenizer.train_loop import TokenizerJob, train_loop_per_worker


def _parent(path: str) -> str:
    if storage.is_uri(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def current_tokenizer(out: str, fingerprint: str) -> dict[str, Any] | None:
    """The ``train.json`` of ``out`` if it records this fingerprint and the checkpoint is intact."""
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
    out = storage.absolute(cfg.out)
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
    storage_path = storage.absolute(cfg.storage_path) if cfg.storage_path else storage.join(_parent(out), "ray")
    run_name = cfg.run_name or f"tokenizer-{cfg.model.kind}-{fingerprint}"
    log(f"tokenizer: training {cfg.model.kind} on {source.describe()}; run {run_name!r} under {storage_path}")
    start = time.perf_counter()
    with ray_session(address):
        if cfg.use_gpu and cfg.num_workers:
            require_gpu(log)
        result = fit(train_loop_per_worker, TokenizerJob(cfg, plan, fingerprint, local_mode=cfg.num_workers == 0),
                     FitSpec("tokenizer training", run_name, storage_path, workers=cfg.num_workers,
                             cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, keep_checkpoints=2,
                             max_failures=cfg.max_failures))
    seconds = time.perf_counter() - start

    info = result.return_value or {}
    if "state" in info:
        tok = build_tokenizer(cfg.model)
        tok.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in info["state"].items()})
        tok.mark_loaded()
    elif result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            tok = load_tokenizer(d)
    else:
        raise StageError(f"tokenizer run {run_name!r} finished without a checkpoint or weights")
    if not info:
        raise StageError(f"tokenizer run {run_name!r} returned no summary from rank 0")

    tok_id = save_tokenizer(tok, out)
    if info.get("reconstructions") is not None:
        storage.write_bytes_atomic(storage.join(out, "reconstructions.png"), encode_png(info["reconstructions"]))
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
