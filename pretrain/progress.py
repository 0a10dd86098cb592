"""What the pretraining loop logs: meters summed on the device, ``metrics.jsonl`` records and the
progress line (rank 0), with an ETA from the steps since the first line."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from pipeline.train_worker import WorkerEnv
from pretrain.checkpoint import MetricsLog
from pretrain.flops import mfu, peak_tflops
from pretrain.plan import RunPlan


class Meter:
    """Sums of (loss, correct, masked count, images, batches) on the device; reduced over ranks on read."""

    def __init__(self, device: torch.device, accuracy: bool = True):
        self.device = device
        self.accuracy = accuracy  # token targets only: pixels have no accuracy
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.start = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], images: int) -> None:
        self.sums += torch.stack([out["loss"].detach().double(), out["correct"].double(), out["count"].double(),
                                  torch.tensor(float(images), dtype=torch.float64, device=self.device),
                                  torch.tensor(1.0, dtype=torch.float64, device=self.device)])

    def read(self, world: int) -> dict[str, float]:
        sums = self.sums.clone()
        if world > 1:
            dist.all_reduce(sums)
        loss, correct, count, images, batches = sums.tolist()
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {"loss": loss / max(batches, 1), "images_per_s": images / seconds, "images": images}
        if self.accuracy and count > 0:
            out["acc"] = correct / count
        self.sums.zero_()
        self.start = time.perf_counter()
        return out


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Step and epoch meters; ``step``/``epoch`` records (all ranks reduce, rank 0 writes and prints)."""

    def __init__(self, plan: RunPlan, env: WorkerEnv, start_step: int, resumed_digest: str | None):
        self.plan, self.env = plan, env
        accuracy = plan.cfg.target != "pixels"
        self.window, self.epoch_meter = Meter(env.device, accuracy), Meter(env.device, accuracy)
        self.peak = peak_tflops(torch.cuda.get_device_name(env.device)) if env.gpu else None
        self.log = MetricsLog(plan.run_dir, start_step) if env.rank == 0 else None
        self.last: dict[str, Any] = {}
        self.eta_from: tuple[float, int] | None = None  # (time, step) of the first progress line
        if self.log is not None and self.log.tb_spool is not None:
            env.say(f"pretrain: TensorBoard events are written to {self.log.tb_spool} on this node and "
                    f"uploaded to {self.log.tb_dir} at every checkpoint")
        if self.log is not None and start_step:
            env.say(f"pretrain: resumed at step {start_step}/{plan.total_steps}")
            self.log.write({"kind": "resume", "step": start_step, "optimizer_digest": resumed_digest})

    def add(self, out: dict[str, torch.Tensor], images: int) -> None:
        self.window.add(out, images)
        self.epoch_meter.add(out, images)

    def step(self, step: int, lr: float, grad_norm: torch.Tensor | None) -> None:
        plan, world = self.plan, self.env.world
        m = self.window.read(world)
        if not torch.isfinite(torch.tensor(m["loss"])):
            raise FloatingPointError(f"loss is {m['loss']} at step {step}")
        spe = plan.steps_per_epoch
        rec = {"kind": "step", "step": step, "epoch": round(step / spe, 4), "lr": lr, **m,
               "model_tflops": m["images_per_s"] * plan.train_flops_per_image / 1e12}
        if self.peak:
            rec["mfu"] = mfu(m["images_per_s"] / world, plan.train_flops_per_image, self.peak)
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        self.last = rec
        if self.log is None:
            return
        self.log.write(rec)
        # from the steps since the first progress line: start-up (loader, first step) would inflate a
        # whole-run average for a long time
        now, end = time.perf_counter(), plan.end_step
        if self.eta_from is None:
            self.eta_from = (now, step)
            eta = (end - step) * plan.cfg.data.batch_size / max(m["images_per_s"], 1e-9)
        else:
            eta = (now - self.eta_from[0]) / max(step - self.eta_from[1], 1) * (end - step)
        acc = f"  acc {m['acc'] * 100:5.1f}%" if "acc" in m else ""
        util = f"  mfu {rec['mfu'] * 100:.0f}%" if "mfu" in rec else ""
        self.env.say(f"pretrain  epoch {step / spe:5.2f}/{plan.total_steps / spe:.4g}  step {step}/{plan.total_steps}"
                     f"  loss {m['loss']:.4f}{acc}  lr {lr:.2e}  {m['images_per_s']:.0f} img/s{util}"
                     f"  eta {fmt_time(eta)}")

    def epoch(self, step: int, lr: float) -> dict[str, Any]:
        """The epoch record (also what is reported to Ray Train at the epoch's end)."""
        e = self.epoch_meter.read(self.env.world)
        rec = {"kind": "epoch", "step": step, "epoch": step // self.plan.steps_per_epoch, "lr": lr, **e}
        if self.log is not None:
            self.log.write(rec)
        return rec

    def checkpoint_metrics(self, step: int) -> dict[str, Any]:
        """What a mid-epoch checkpoint is reported with: the last step record's figures."""
        return {"kind": "checkpoint", "step": step, **{k: v for k, v in self.last.items() if k not in ("kind", "step")}}

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()

    def close(self, step: int, steps_here: int, seconds: float) -> list[int]:
        """The end record; every rank's step count (gathered: they must agree, or DDP would have hung) and
        the Ray node it ran on (where a multi-node run actually placed its ranks)."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        rank_steps, rank_nodes = [steps_here], [node_id]
        if self.env.world > 1:
            gathered: list[Any] = [None] * self.env.world
            dist.all_gather_object(gathered, (steps_here, node_id))
            rank_steps = [int(x[0]) for x in gathered]
            rank_nodes = [str(x[1]) for x in gathered]
        if self.log is not None:
            self.log.write({"kind": "end", "step": step, "rank_steps": rank_steps, "rank_nodes": rank_nodes,
                            "seconds": round(seconds, 2)})
            self.log.close()
        return rank_steps
