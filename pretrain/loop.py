"""The training loop each Ray Train worker runs (one DDP rank).

Every rank builds the same model (same seed; DDP also broadcasts rank 0's weights), restores the
latest checkpoint if Ray Train has one (a rerun of the same named run, or a restart after a worker
failure), streams exactly ``end_step - start_step`` batches (``pretrain.data``), and steps AdamW with
warmup + cosine and gradient clipping; bf16 autocast on GPU, fp32 on CPU. Metrics are summed over
ranks every ``log_every`` steps and at epoch ends; rank 0 writes ``metrics.jsonl`` and prints a
progress line. ``ray.train.report`` (a barrier on all ranks) is called at epoch ends and checkpoint
steps, with rank 0's checkpoint directory.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from pipeline.config import dump_config, from_dict


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


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def say(line: str) -> None:
    """A progress line: straight to stdout (Ray Train's patched ``print`` would also log it, twice over)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _tokenizer_on(tok: Any, device: torch.device) -> Any:
    if isinstance(tok, torch.nn.Module):
        return tok.to(device).eval()
    if hasattr(tok, "to"):
        moved = tok.to(device)
        tok = moved if moved is not None else tok
    if hasattr(tok, "eval"):
        tok.eval()
    return tok


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batch: dict[str, torch.Tensor],
               device: torch.device, *, mean: torch.Tensor, std: torch.Tensor, tokenizer: Any = None,
               autocast=contextlib.nullcontext, clip: float | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
    """One optimizer step on one loader batch: normalise the uint8 images (``mean``/``std`` on ``device``),
    run the tokenizer on the batch (tokens-online), forward, backward, clip, AdamW, schedule.
    Returns the model's outputs, the gradient norm and the lr used."""
    from pretrain.data import normalize

    # (the named ranges are what bench/bench_pretrain.py's step profile splits the step by)
    with record_function("step.input"):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        images = normalize(batch["image"], mean, std)
    with autocast():
        tokens = batch.get("tokens")
        if tokenizer is not None:
            with torch.no_grad(), record_function("step.tokenizer"):
                tokens = tokenizer.encode(batch["tok_image"].float().div_(255.0))  # [0, 1], as the interface asks
        with record_function("step.forward"):
            out = model(images, batch["mask"], tokens)
    optimizer.zero_grad(set_to_none=True)
    with record_function("step.backward"):
        out["loss"].backward()
    with record_function("step.optimizer"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return out, grad_norm, lr


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    from pipeline.ray_context import quiet_train_worker_logs
    from pretrain.checkpoint import MetricsLog, checkpoint_state, load_checkpoint, optimizer_digest, save_checkpoint
    from pretrain.data import SampleTransform, make_dataset, make_loader
    from pretrain.flops import mfu, peak_tflops
    from pretrain.masking import make_masker
    from pretrain.model import build_model
    from pretrain.optim import make_optimizer, make_scheduler
    from pretrain.config import PretrainConfig
    from pretrain.train import RunPlan

    quiet_train_worker_logs()
    cfg: PretrainConfig = from_dict(PretrainConfig, config["cfg"])
    plan = RunPlan(**config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext

    torch.manual_seed(cfg.seed)
    core = build_model(cfg.model, cfg.data.img_size, cfg.target, plan.vocab_size)
    model = ray.train.torch.prepare_model(core)  # to device; DDP when world > 1
    if cfg.compile:
        core.compile_blocks()  # in place, so DDP and checkpoints see the same module
    peak = peak_tflops(torch.cuda.get_device_name(device)) if gpu else None
    optimizer = make_optimizer(core, cfg.optim, fused=gpu)
    scheduler = make_scheduler(optimizer, cfg.optim, plan.total_steps, plan.warmup_steps)

    start_step, resumed_digest = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, core, optimizer, scheduler, device)
        start_step = int(state["step"])
        resumed_digest = optimizer_digest(optimizer.state_dict())
    end_step = plan.end_step

    tokenizer = None
    if cfg.target == "tokens-online":
        from pretrain.train import _load_tokenizer

        tokenizer = _tokenizer_on(_load_tokenizer(cfg.data.tokenizer), device)

    log = MetricsLog(plan.run_dir, start_step) if rank == 0 else None
    if rank == 0 and start_step:
        say(f"pretrain: resumed at step {start_step}/{plan.total_steps}")
        log.write({"kind": "resume", "step": start_step, "optimizer_digest": resumed_digest})

    masker = make_masker(cfg.mask.mode, tuple(plan.grid), plan.num_masked, min_block=cfg.mask.min_block,
                         max_block=cfg.mask.max_block, min_aspect=cfg.mask.min_aspect)
    mean = torch.tensor(cfg.data.mean, dtype=torch.float32, device=device)
    std = torch.tensor(cfg.data.std, dtype=torch.float32, device=device)
    transform = SampleTransform(
        img_size=cfg.data.img_size, masker=masker, target=cfg.target,
        tok_input_size=plan.tok_input_size, augment=cfg.data.augment, crop_scale=cfg.data.crop_scale,
        seed=cfg.seed, rank=rank, salt=start_step, vocab_size=plan.vocab_size if cfg.target == "tokens" else None,
    )
    dataset = make_dataset(plan.urls, transform, plan.per_worker_batch, shuffle_buffer=cfg.data.shuffle_buffer,
                           rank=rank, world=world, seed=cfg.seed * 7919 + rank * 104729 + start_step,
                           sha256=plan.shard_sha256 if cfg.data.verify_shards else None)
    remaining = max(0, end_step - start_step)
    # (with_epoch(0) would mean "no limit": a finished run gets no loader at all)
    loader = make_loader(dataset, remaining, workers=cfg.data.loader_workers, prefetch=cfg.data.prefetch,
                         pin_memory=gpu) if remaining else []
    config_yaml = dump_config(cfg)
    spe = plan.steps_per_epoch
    window, epoch_meter = Meter(device, cfg.target != "pixels"), Meter(device, cfg.target != "pixels")
    step, steps_here, last = start_step, 0, {}
    eta_from: tuple[float, int] | None = None  # (time, step) of the first progress line
    run_start = time.perf_counter()
    model.train()

    def save_and_report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        name = f"checkpoint_{step:08d}"
        if rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        state = checkpoint_state(core, step=step, total_steps=plan.total_steps, steps_per_epoch=spe,
                                 img_size=cfg.data.img_size, mean=cfg.data.mean, std=cfg.data.std,
                                 target=cfg.target, vocab_size=plan.vocab_size, tokenizer_id=plan.tokenizer_id,
                                 optimizer=optimizer)
        with tempfile.TemporaryDirectory(prefix="mimflow-ckpt-") as tmp:
            save_checkpoint(tmp, core, optimizer, scheduler, state, config_yaml)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        log.flush()

    for batch in loader:
        out, grad_norm, lr = train_step(model, optimizer, scheduler, batch, device, mean=mean, std=std,
                                        tokenizer=tokenizer, autocast=autocast, clip=cfg.optim.clip)
        images = batch["image"]
        step += 1
        steps_here += 1
        window.add(out, images.shape[0])
        epoch_meter.add(out, images.shape[0])

        epoch_end = step % spe == 0
        do_ckpt = step % cfg.checkpoint_every == 0 or step == end_step
        if step % cfg.log_every == 0 or step == end_step or epoch_end:
            m = window.read(world)
            if not torch.isfinite(torch.tensor(m["loss"])):
                raise FloatingPointError(f"loss is {m['loss']} at step {step}")
            rec = {"kind": "step", "step": step, "epoch": round(step / spe, 4), "lr": lr, **m,
                   "model_tflops": m["images_per_s"] * plan.train_flops_per_image / 1e12}
            if peak:
                rec["mfu"] = mfu(m["images_per_s"] / world, plan.train_flops_per_image, peak)
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            last = rec
            if rank == 0:
                log.write(rec)
                # from the steps since the first progress line: start-up (loader, first step) would
                # inflate a whole-run average for a long time
                now = time.perf_counter()
                if eta_from is None:
                    eta_from = (now, step)
                    eta = (end_step - step) * cfg.data.batch_size / max(m["images_per_s"], 1e-9)
                else:
                    eta = (now - eta_from[0]) / max(step - eta_from[1], 1) * (end_step - step)
                acc = f"  acc {m['acc'] * 100:5.1f}%" if "acc" in m else ""
                util = f"  mfu {rec['mfu'] * 100:.0f}%" if "mfu" in rec else ""
                say(f"pretrain  epoch {step / spe:5.2f}/{plan.total_steps / spe:.4g}  step {step}/{plan.total_steps}"
                    f"  loss {m['loss']:.4f}{acc}  lr {lr:.2e}  {m['images_per_s']:.0f} img/s{util}"
                    f"  eta {_fmt_time(eta)}")
        report: dict[str, Any] = {}
        if epoch_end:
            e = epoch_meter.read(world)
            report = {"kind": "epoch", "step": step, "epoch": step // spe, "lr": lr, **e}
            if rank == 0:
                log.write(report)
        if epoch_end or do_ckpt:
            save_and_report(report or {"kind": "checkpoint", "step": step, **{k: v for k, v in last.items()
                                                                              if k not in ("kind", "step")}},
                            with_checkpoint=do_ckpt)

    rank_steps = [steps_here]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, steps_here)
        rank_steps = [int(x) for x in gathered]
    seconds = time.perf_counter() - run_start
    if log is not None:
        log.write({"kind": "end", "step": step, "rank_steps": rank_steps, "seconds": round(seconds, 2)})
        log.close()
    return {
        "start_step": start_step, "step": step, "total_steps": plan.total_steps, "rank_steps": rank_steps,
        "resumed_optimizer_digest": resumed_digest, "train_seconds": round(seconds, 2),
        **{k: v for k, v in last.items() if k in ("loss", "acc", "lr", "images_per_s")},
    }
