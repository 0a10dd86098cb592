"""Inside a Ray Train worker: what every training loop (pretraining, tokenizer, fine-tuning) shares.

``worker_env`` (rank, world size, device, autocast, the rank-0 printer, DDP wrapping, all-reduce),
``seed_everything``/``derive_seed``, the one warmup + cosine schedule
(``warmup_cosine``; ``WarmupCosine`` is its ``LambdaLR`` form; ``apply_lr`` honours per-group
``lr_scale``), the one AdamW parameter grouping (``param_groups``: no decay on norms, biases,
position tables and tokens; optional layer-wise lr decay), and checkpoint-and-report
(``report``, ``restored``, ``save_weights``/``load_weights``, ``save_torch``/``load_torch``).
The driver side (``fit``, the only ``TorchTrainer``) is ``pipeline.train_harness``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from pipeline.ray_context import quiet_train_worker_logs


# ------------------------------------------------------------------------------ the worker's place
@dataclass
class WorkerEnv:
    rank: int
    world: int
    device: torch.device
    amp: bool  # bf16 autocast: GPU only (on CPU it made a ViT step ~14x slower)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def say(self, line: str) -> None:
        """A progress line from rank 0 only, to the real stdout, flushed: Ray Train's patched ``print``
        would log it a second time, and every rank printing would show it ``world`` times."""
        if self.rank == 0:
            sys.__stdout__.write(line + "\n")
            sys.__stdout__.flush()

    def wrap(self, model: torch.nn.Module, broadcast_buffers: bool = True) -> torch.nn.Module:
        """``model`` on the device; DDP around it when there is more than one rank."""
        model.to(self.device)
        if self.world == 1:
            return model
        ids = dict(device_ids=[self.device], output_device=self.device) if self.gpu else {}
        return DistributedDataParallel(model, broadcast_buffers=broadcast_buffers, **ids)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (on the training device: NCCL reduces CUDA tensors only); same device back."""
        if self.world == 1 or not dist.is_initialized():
            return t
        on = t.to(self.device)
        dist.all_reduce(on)
        return on.to(t.device)


def worker_env(*, cpus: float, use_gpu: bool, amp: bool = True) -> WorkerEnv:
    """Set the worker up (quiet logs, torch threads = reserved CPUs) and say where it stands."""
    quiet_train_worker_logs()
    torch.set_num_threads(max(1, int(cpus)))
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and bare .cuda() calls use the current device
    return WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), device, amp and device.type == "cuda")


# ------------------------------------------------------------------------------------------ seeds
def seed_everything(seed: int) -> None:
    """torch's global RNG (initial weights, drop path): the same on every rank, so DDP starts equal."""
    torch.manual_seed(seed)


def derive_seed(seed: int, a: int = 0, b: int = 0) -> int:
    """The seed of one stream (a data order, an augmentation generator) named by two integers
    (e.g. rank and resume step, or epoch and rank): distinct streams for distinct pairs."""
    return seed * 7919 + a * 104729 + b


# ------------------------------------------------------------------------------------------ input
# --------------------------------------------------------------------------------------- schedule
def warmup_cosine(step: int, total: int, warmup: int, peak: float, end: float) -> float:
    """The value at ``step`` (0-based): linear warmup to ``peak``, then cosine down to ``end``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * t))


class WarmupCosine:
    """``warmup_cosine`` as a ``LambdaLR`` factor (1 at the peak, ``min_lr / lr`` at the end); each
    group's own lr is scaled by it. A plain object (not a closure) so that ``LambdaLR.state_dict``
    saves its fields and a checkpoint loads with ``torch.load(weights_only=True)``."""

    def __init__(self, total_steps: int, warmup_steps: int, lr: float, min_lr: float):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.floor = float(min_lr) / float(lr) if lr > 0 else 0.0

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, 1.0, self.floor)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (layer decay), 1 when it has none."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# -------------------------------------------------------------------------------- parameter groups
_NO_DECAY_LEAVES = ("pos_embed", "cls_token", "mask_token")


def no_weight_decay(name: str, param: torch.nn.Parameter, skip: set[str]) -> bool:
    """Norms, biases, layer scales (1-d), position tables and tokens; plus the model's own list."""
    return (param.ndim <= 1 or name.endswith(".bias") or name in skip or name.split(".")[-1] in _NO_DECAY_LEAVES
            or "relative_position_bias_table" in name)


def layer_id(name: str, depth: int) -> int:
    """0 for the stem (patch embedding, [CLS], position embeddings), i+1 for ``blocks.i``, depth+1 for the rest."""
    m = re.match(r"^blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "mask_token", "rel_pos_bias"):
        return 0
    return depth + 1


def param_groups(model: torch.nn.Module, weight_decay: float, *, layer_decay: float | None = None,
                 base_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay / no decay (``no_weight_decay``). With ``layer_decay`` (a ViT with
    ``blocks``): one pair per layer, block ``i`` of ``depth`` scaled by ``layer_decay^(depth - i)``,
    the stem by ``layer_decay^(depth + 1)``, the rest by 1; each group carries ``lr_scale`` and
    ``lr = base_lr * lr_scale``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth = len(model.blocks) if layer_decay is not None else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    if layer_decay is None:  # always both groups, in this order (the optimizer's state lists them so)
        groups = {(0, False): {"params": [], "weight_decay": weight_decay},
                  (0, True): {"params": [], "weight_decay": 0.0}}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = no_weight_decay(name, p, skip)
        if layer_decay is None:
            groups[(0, nd)]["params"].append(p)
            continue
        lid = layer_id(name, depth)
        if (lid, nd) not in groups:
            scale = float(layer_decay ** (depth + 1 - lid))
            groups[(lid, nd)] = {"params": [], "param_names": [], "layer": lid, "lr_scale": scale,
                                 "lr": (base_lr or 0.0) * scale, "weight_decay": 0.0 if nd else weight_decay}
        groups[(lid, nd)]["params"].append(p)
        groups[(lid, nd)]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


# -------------------------------------------------------------------------- checkpoint and report
def report(metrics: dict[str, Any], *, name: str | None = None,
           write: Callable[[Path], None] | None = None) -> None:
    """``ray.train.report`` on every rank (it is a barrier). With ``write``, rank 0 writes a checkpoint
    directory with it and reports that as checkpoint ``name``; the other ranks report none."""
    if write is None:
        ray.train.report(metrics)
        return
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="mimflow-ckpt-") as tmp:
        write(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


@contextlib.contextmanager
def restored() -> Iterator[Path | None]:
    """The newest checkpoint this run reported (a rerun of the named run, or a restart after a worker
    failure) as a local directory, or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


def save_weights(module_or_state: torch.nn.Module | dict[str, torch.Tensor], path: str | Path) -> None:
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path))


def load_weights(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def save_torch(obj: Any, path: str | Path) -> None:
    """Optimizer/scheduler/RNG state: tensors and plain containers only (loads with ``weights_only``)."""
    torch.save(obj, path)


def load_torch(path: str | Path, device: torch.device | str = "cpu") -> Any:
    return torch.load(path, map_location=device, weights_only=True)


def save_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))


__all__ = ["WarmupCosine", "WorkerEnv", "apply_lr", "derive_seed", "layer_id", "load_torch", "load_weights",
           "no_weight_decay", "param_groups", "report", "restored", "save_json", "save_torch",
           "save_weights", "seed_everything", "warmup_cosine", "worker_env"]
