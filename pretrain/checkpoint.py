"""Pretraining checkpoints and the metrics log.

A checkpoint directory (what ``ray.train.report`` persists as ``<out>/<run_name>/checkpoint_<step>``):

``model.safetensors``  the whole MIM model (``encoder.*`` is the timm Beit; ``mask_token``, ``head.*``...)
``optimizer.pt``       AdamW state (``torch.save``; loaded with ``torch.load(weights_only=True)``)
``scheduler.pt``       LambdaLR state (same)
``state.json``         step, epoch, and what an export needs: timm kwargs, img size, mean/std, target...
``config.yaml``        the resolved pretraining config
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
from pipeline.train_worker import load_torch, load_weights, save_torch, save_weights

MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
STATE = "state.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def checkpoint_state(model: torch.nn.Module, *, step: int, total_steps: int, steps_per_epoch: int, img_size: int,
                     mean, std, target: str, vocab_size: int | None, tokenizer_id: str | None,
                     optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """``state.json``: progress, and what an export needs to rebuild the encoder without the config."""
    return {
        "step": step, "epoch": step / max(steps_per_epoch, 1), "total_steps": total_steps, "target": target,
        "vocab_size": vocab_size, "tokenizer_id": tokenizer_id,
        "optimizer_digest": optimizer_digest(optimizer.state_dict()) if optimizer is not None else None,
        "encoder": {"timm_kwargs": model.kwargs, "img_size": img_size, "patch_size": model.kwargs["patch_size"],
                    "mean": [float(x) for x in mean], "std": [float(x) for x in std]},
    }


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], config_yaml: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / MODEL)
    save_torch(optimizer.state_dict(), directory / OPTIMIZER)
    save_torch(scheduler.state_dict(), directory / SCHEDULER)
    (directory / STATE).write_text(json.dumps(state, indent=1))
    (directory / CONFIG).write_text(config_yaml)
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint directory (a local path or a URI)."""
    path = storage.join(directory, STATE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{directory} is not a pretraining checkpoint (no {STATE})")
    return json.loads(storage.read_bytes(path))


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Restore model (strict), optimizer and scheduler in place; returns ``state.json``."""
    directory = Path(directory)
    model.load_state_dict(load_weights(directory / MODEL, device), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(load_torch(directory / OPTIMIZER, device))
    if scheduler is not None:
        scheduler.load_state_dict(load_torch(directory / SCHEDULER))
    return read_state(directory)


def optimizer_digest(state_dict: dict[str, Any]) -> str:
    """A short sha256 over an optimizer state dict's tensors and numbers (to compare across runs)."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(f"K{k}".encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for x in obj:
                feed(x)
        else:
            h.update(f"V{obj!r}".encode())

    feed(state_dict)
    return h.hexdigest()[:16]


def latest_checkpoint(location: str | Path) -> str:
    """A checkpoint directory itself, or the newest ``checkpoint_*`` inside a run directory (local or URI)."""
    location = str(location)
    if storage.exists(storage.join(location, STATE)):
        return location
    found = [storage.join(location, name) for name in storage.list_names(location) if name.startswith("checkpoint_")]
    steps = {}
    for ckpt in found:
        with contextlib.suppress(FileNotFoundError):  # a directory without state.json is no checkpoint
            steps[ckpt] = read_state(ckpt).get("step", -1)
    if not steps:
        raise FileNotFoundError(f"no pretraining checkpoint at {location} (expected {STATE} or checkpoint_*/)")
    return max(sorted(steps), key=steps.__getitem__)


class MetricsLog:
    """``metrics.jsonl`` under the run directory (rank 0 only), plus TensorBoard events in
    ``<run>/tensorboard/`` when tensorboard is installed.

    Local paths are appended to line by line; object-store URIs are rewritten whole on ``flush``.
    On resume, records past the resumed step (written after the last checkpoint) are dropped.
    TensorBoard writes through its own file layer (TensorFlow's gfile, or boto3 configured by other
    variables than ours, no ``gs://`` without TensorFlow) and appends to an open file, which an object
    store cannot do: for a URI run directory its events go to a local temporary directory
    (``tb_spool``) and are uploaded through ``pipeline.storage`` at every ``flush`` (each checkpoint)
    and at ``close``.
    """

    def __init__(self, run_dir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = storage.join(run_dir, METRICS)
        self.local = not storage.is_uri(self.path)
        self.lines: list[str] = []
        if storage.exists(self.path):
            for line in storage.read_bytes(self.path).decode().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    self.lines.append(line)
        if resume_step == 0:
            self.lines = []
        storage.write_bytes_atomic(self.path, "".join(x + "\n" for x in self.lines).encode())
        self._file = open(self.path, "a") if self.local else None
        self.tb = None
        self.tb_dir = storage.join(run_dir, TENSORBOARD)
        self.tb_spool: str | None = None  # the local directory TensorBoard writes to for a URI run dir
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                return
            if not self.local:
                self.tb_spool = tempfile.mkdtemp(prefix="mimflow-tensorboard-")
            # purge_step: TensorBoard hides the events a killed run wrote past the resumed step
            self.tb = SummaryWriter(log_dir=self.tb_spool or self.tb_dir, purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "time": round(time.time(), 3)}
        line = json.dumps(record)
        self.lines.append(line)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        if self.tb is not None:
            kind = record.get("kind", "step")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                    self.tb.add_scalar(f"{kind}/{k}", v, record.get("step", 0))

    def flush(self) -> None:
        if self._file is None:
            storage.write_bytes_atomic(self.path, "".join(x + "\n" for x in self.lines).encode())
        if self.tb is not None:
            self.tb.flush()
            self._upload_tensorboard()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()
            self._upload_tensorboard()
            self.tb = None
            if self.tb_spool is not None:
                shutil.rmtree(self.tb_spool, ignore_errors=True)

    def _upload_tensorboard(self) -> None:
        """Copy the spooled event files up whole (each is small: scalars only; a resume writes a new one)."""
        if self.tb_spool is None:
            return
        for path in sorted(Path(self.tb_spool).rglob("*")):
            if path.is_file():
                storage.write_bytes_atomic(storage.join(self.tb_dir, *path.relative_to(self.tb_spool).parts),
                                           path.read_bytes())


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = storage.join(run_dir, METRICS)
    if not storage.exists(path):
        return []
    return [json.loads(x) for x in storage.read_bytes(path).decode().splitlines() if x.strip()]


__all__ = ["MetricsLog", "checkpoint_state", "latest_checkpoint", "load_checkpoint", "optimizer_digest", "read_metrics",
           "read_state", "save_checkpoint"]
