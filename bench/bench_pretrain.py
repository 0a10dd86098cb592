"""Pretraining images/s with cached tokens vs ``tokens-online`` (the tokenizer in the step), one run.

Same model, same data, same batch, same tokenizer; the only difference is where the targets come
from. Both arms run ``pretrain.loop.train_step`` (the training loop's own step) on batches made by the
real loader from a real token cache (``pipeline.token_cache`` format), held in memory so that the loader
(measured separately by ``bench_loader``) does not colour the comparison. The tokenizer's share of an
online step is measured too; removing it can at best give ``limit = 1 / (1 - share)``, and the cache
should reach at least 95% of that limit. The share is timed inside the online step (a separate pass,
so the timing's synchronisation does not slow the timed online steps). Each record also gives the model
FLOP/s of the cached arm (``pretrain.flops``), MFU where the device's peak is known (GPU), and a
profile of both arms' steps: time per ``train_step`` range (input, tokenizer, forward, backward,
optimizer) and the top ops.

    python -m bench.bench_pretrain --size cpu     # base proportions scaled down, then the demo's pair; CPU
                                                  # (and the demo's step with 1 thread vs one per core)
    python -m bench.bench_pretrain --size gpu     # ViT-B/16 at 224 px + BEiT v1's dVAE at 112 px, bf16,
                                                  # torch.compile'd blocks
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

from bench.common import emit, size_parser
from pipeline.config import to_dict

_SMALL_VIT = dict(dim=128, depth=4, heads=4, patch=8, drop_path=0.0, layer_scale=0.1)
SIZES: dict[str, list[dict[str, Any]]] = {
    "cpu": [
        # BEiT v1's proportions, scaled down: the tokenizer sees the image at half resolution (as the
        # dVAE sees 112 px of 224) and its forward costs about a ViT forward (~1/4-1/3 of a training
        # step; the measured share is reported)
        dict(variant="base-proportions", img=64, n=256, batch=64, warmup=2, steps=10, repeats=3, model=_SMALL_VIT,
             num_masked=26, min_block=4,
             tok=dict(kind="dvae", vocab_size=256, grid=8, input_size=32, width=48, depth=2, code_dim=32)),
        # the demo pair: pretrain/recipes/demo.yaml's model and masking, the packaged demo tokenizer
        # (tokenizer/recipes/demo.yaml: a VQ-KD ViT at 64 px)
        dict(variant="demo", img=64, n=256, batch=64, warmup=2, steps=10, repeats=3, model="recipe:demo",
             mask="random", num_masked=26, min_block=4, tok="recipe:demo"),
    ],
    "gpu": [
        # BEiT v1 base: ViT-B/16 at 224 px and tokenizer/recipes/dvae_base.yaml (vocab 8192, 14x14 at 112 px)
        dict(variant="base", img=224, n=1024, batch=128, warmup=5, steps=30, repeats=3, compile=True,
             model=dict(dim=768, depth=12, heads=12, patch=16, drop_path=0.1, layer_scale=0.1),
             num_masked=75, min_block=16,
             tok=dict(kind="dvae", vocab_size=8192, grid=14, input_size=112, width=128, depth=2, code_dim=256)),
    ],
}


def tokenizer_config(spec: dict[str, Any] | str):
    """A ``TokenizerConfig`` from kwargs, or ``recipe:NAME`` for a packaged tokenizer recipe's model."""
    from tokenizer.base import TokenizerConfig

    if isinstance(spec, str) and spec.startswith("recipe:"):
        from pipeline.config import load_config
        from tokenizer.train_config import TokenizerTrainConfig

        return load_config(TokenizerTrainConfig, spec.split(":", 1)[1]).model
    return TokenizerConfig(**spec)


def model_config(spec: dict[str, Any] | str):
    """A ``ModelConfig`` from kwargs, or ``recipe:NAME`` for a packaged pretraining recipe's model."""
    from pretrain.model import ModelConfig

    if isinstance(spec, str) and spec.startswith("recipe:"):
        from pipeline.config import load_config
        from pretrain.config import PretrainConfig

        return load_config(PretrainConfig, spec.split(":", 1)[1]).model
    return ModelConfig(**spec)


def setup(s: dict[str, Any], workdir: str, device: torch.device, targets=("tokens", "tokens-online")):
    """A saved tokenizer, a real cache made with it, and in-memory batches per target from the real loader."""
    from pretrain.data import SampleTransform, make_dataset, make_loader
    from pretrain.masking import make_masker
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from cache_fixture import write_cache  # a real-format cache from a tokenizer, one shard of n images
    from tokenizer.checkpoint import build_tokenizer, load_tokenizer, save_tokenizer

    torch.manual_seed(0)
    tok_dir = os.path.join(workdir, "tokenizer")
    tcfg = tokenizer_config(s["tok"])
    save_tokenizer(build_tokenizer(tcfg), tok_dir)
    tok = load_tokenizer(tok_dir, map_location=device)
    cache = os.path.join(workdir, "tokens", tok.tokenizer_id)
    write_cache(cache, tok, f"shapes?n={s['n']}&size={s['img']}&seed=1", [s["n"]])
    grid = (s["img"] // model_config(s["model"]).patch,) * 2
    masker = make_masker(s.get("mask", "block"), grid, s["num_masked"], min_block=s["min_block"])
    from pipeline.token_cache import check_cache, shard_urls

    _, rows = check_cache(cache, tok.tokenizer_id)
    urls = shard_urls(cache, rows)
    batches = {}
    nb = s["warmup"] + s["steps"]
    for target in targets:
        t = SampleTransform(img_size=s["img"], masker=masker, target=target,
                            tok_input_size=tok.input_size)
        loader = make_loader(make_dataset(urls, t, s["batch"], shuffle_buffer=256), nb, workers=min(4, os.cpu_count() or 1))
        batches[target] = [{k: v.to(device) for k, v in b.items()} for b in loader]
    return tok, batches, urls, masker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_profile(run: Callable[[], None], steps: int, device: torch.device, top: int = 8) -> dict[str, Any]:
    """ms per step in each of ``train_step``'s named ranges (host time), and the ops that take the most
    time (on GPU their kernels' time, on CPU host time).

    Ranges are host time on GPU too: backward kernels are launched from autograd's device thread, outside
    the range that calls ``backward()``, so ranges cannot own their kernels; host time per range next to
    the step time shows whether the host keeps the GPU fed.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        run()
        _sync(device)
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)  # noqa: E731
    ms = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731
    phases = {e.key.split(".", 1)[1]: ms(e.cpu_time_total) for e in events if e.key.startswith("step.")}
    # host-side op events only: on GPU the kernels are events too, and their time is already in the
    # self device time of the ops that launched them
    ops = sorted((e for e in events if not e.key.startswith("step.") and e.device_type == DeviceType.CPU),
                 key=own, reverse=True)
    all_ops = sum(own(e) for e in ops) or 1.0
    return {"phases_host_ms": phases, "top_ops_time": "device" if gpu else "host",
            "top_ops": [{"op": e.key, "ms": ms(own(e)), "share": round(own(e) / all_ops, 3)} for e in ops[:top]]}


def measure(s: dict[str, Any], device: torch.device, peak: float | None = None) -> dict[str, Any]:
    from pretrain.flops import mfu, train_flops_per_image
    from pretrain.loop import train_step
    from pretrain.model import MIMModel
    from pretrain.optim import OptimConfig, make_optimizer, make_scheduler

    gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as workdir:
        tok, batches, _, _ = setup(s, workdir, device)
        torch.manual_seed(0)
        model = MIMModel(model_config(s["model"]), s["img"], "tokens", tok.vocab_size).to(device)
        if s.get("compile"):
            model.compile_blocks()
        ocfg = OptimConfig(lr=1e-4)
        opt = make_optimizer(model, ocfg, fused=gpu)
        sched = make_scheduler(opt, ocfg, 10**6, 0)
        mean = std = torch.full((3,), 0.5, device=device)

        def step_times(target: str, tk=None) -> list[float]:
            bs = batches[target]
            for b in bs[: s["warmup"]]:
                train_step(model, opt, sched, b, device, mean=mean, std=std, tokenizer=tk, autocast=autocast,
                           clip=3.0)
            times = []
            for b in bs[s["warmup"]:]:
                _sync(device)
                t0 = time.perf_counter()
                train_step(model, opt, sched, b, device, mean=mean, std=std, tokenizer=tk, autocast=autocast,
                           clip=3.0)
                _sync(device)
                times.append(time.perf_counter() - t0)
            return times

        class TimedTokenizer:
            """The tokenizer as the online step calls it, timing each call (its share of the step)."""

            def __init__(self):
                self.times: list[float] = []

            def encode(self, images):
                _sync(device)
                t0 = time.perf_counter()
                out = tok.encode(images)
                _sync(device)
                self.times.append(time.perf_counter() - t0)
                return out

        model.train()
        cached, online, tok_s = [], [], []
        for _ in range(s["repeats"]):  # interleaved rounds: both arms see the same machine conditions
            cached += step_times("tokens")
            online += step_times("tokens-online", tok)
            timed = TimedTokenizer()
            step_times("tokens-online", timed)  # a third pass, timing the tokenizer inside the step
            tok_s += timed.times[s["warmup"]:]
        profiles = {}
        for target, tk in (("tokens", None), ("tokens-online", tok)):
            run = lambda: [train_step(model, opt, sched, b, device, mean=mean, std=std, tokenizer=tk,  # noqa: E731
                                      autocast=autocast, clip=3.0) for b in batches[target][s["warmup"]:]]
            profiles["cached" if tk is None else "online"] = step_profile(run, s["steps"], device)
    # per-step times, lower quartile: robust to other processes stealing cores for a while
    q = lambda xs: float(np.quantile(xs, 0.25))  # noqa: E731
    cached_ips, online_ips = s["batch"] / q(cached), s["batch"] / q(online)
    online_step_s = q(online)
    share = q(tok_s) / online_step_s
    limit = 1.0 / (1.0 - share) if share < 1 else float("inf")
    ratio = cached_ips / online_ips
    flops = train_flops_per_image(model_config(s["model"]), s["img"], tok.vocab_size, s["num_masked"])
    utilisation = {"model_tflops": round(cached_ips * flops / 1e12, 4)}
    if peak:
        utilisation.update(peak_tflops=peak, mfu=round(mfu(cached_ips, flops, peak), 4),
                           mfu_online=round(mfu(online_ips, flops, peak), 4))
    return {
        "bench": "pretrain_cached_vs_online" + ("" if s["variant"] != "demo" else "_demo"),
        "variant": s["variant"],
        "figure": round(cached_ips, 1),
        "reference": round(online_ips, 1),
        "unit": "images/s",
        "ratio": round(ratio, 3),
        "limit": round(limit, 3),
        "ratio_of_limit": round(ratio / limit, 3),
        "target": 0.95,
        "tokenizer_share": round(share, 3),
        "step_ms": {"cached": round(q(cached) * 1e3, 2), "online": round(online_step_s * 1e3, 2),
                    "tokenizer": round(q(tok_s) * 1e3, 2), "cached_median": round(float(np.median(cached)) * 1e3, 2),
                    "online_median": round(float(np.median(online)) * 1e3, 2)},
        "steps_timed": len(cached),
        "train_gflops_per_image": round(flops / 1e9, 3),
        **utilisation,
        "profile": profiles,
        "size": "gpu" if gpu else "cpu",
        "sizes": {"img": s["img"], "batch": s["batch"], "steps": s["steps"], "model": to_dict(model_config(s["model"])),
                  "tokenizer": {k: v for k, v in to_dict(tokenizer_config(s["tok"])).items()
                                if k in ("kind", "vocab_size", "grid", "input_size", "width", "depth", "code_dim")},
                  "num_masked": s["num_masked"]},
        "device": str(device),
        "dtype": "bf16 autocast" if gpu else "fp32",
        "compiled": bool(s.get("compile")),
        "threads": torch.get_num_threads(),
    }


def measure_threads(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The cached step with one torch thread vs one per core, interleaved rounds: what `cpus_per_worker`
    (a worker's torch threads) should be in the CPU recipes."""
    from pretrain.loop import train_step
    from pretrain.model import MIMModel
    from pretrain.optim import OptimConfig, make_optimizer, make_scheduler

    cores = os.cpu_count() or 1
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as workdir:
        tok, batches, _, _ = setup(s, workdir, device, targets=("tokens",))
        torch.manual_seed(0)
        model = MIMModel(model_config(s["model"]), s["img"], "tokens", tok.vocab_size).to(device).train()
        ocfg = OptimConfig(lr=1e-4)
        opt = make_optimizer(model, ocfg)
        sched = make_scheduler(opt, ocfg, 10**6, 0)
        mean = std = torch.full((3,), 0.5, device=device)
        times: dict[int, list[float]] = {1: [], cores: []}
        try:
            for _ in range(s["repeats"]):
                for n in times:
                    torch.set_num_threads(n)
                    for i, b in enumerate(batches["tokens"]):
                        t0 = time.perf_counter()
                        train_step(model, opt, sched, b, device, mean=mean, std=std, clip=3.0)
                        if i >= s["warmup"]:
                            times[n].append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(before)
    ips = {n: s["batch"] / float(np.quantile(ts, 0.25)) for n, ts in times.items()}
    return {"bench": "pretrain_threads_demo", "variant": s["variant"], "figure": round(ips[cores], 1),
            "reference": round(ips[1], 1), "unit": "images/s", "ratio": round(ips[cores] / ips[1], 3),
            "threads": {"figure": cores, "reference": 1}, "steps_timed": len(times[1]), "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    from pretrain.flops import peak_tflops

    parser = size_parser(__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: known GPUs by name; none on CPU)")
    args = parser.parse_args(argv)
    gpu = args.size == "gpu"
    if gpu and not torch.cuda.is_available():
        print("bench_pretrain: --size gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if gpu else "cpu")
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if gpu else None)
    for spec in SIZES[args.size]:
        emit(measure(spec, device, peak))
        if spec["variant"] == "demo" and not gpu:
            emit(measure_threads(spec, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
