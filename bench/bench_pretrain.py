"""Pretraining images/s with cached tokens vs ``tokens-online`` (the tokenizer in the step), one run.

Same model, same data, same batch, same tokenizer; the only difference is where the targets come
from. Both arms run ``pretrain.loop.train_step`` (the training loop's own step) on batches made by the
real loader from a real token cache (``pipeline.shards`` format), held in memory so that the loader
(measured separately by ``bench_loader``) does not colour the comparison. The tokenizer's share of an
online step is measured too; removing it can at best give ``limit = 1 / (1 - share)``, and the cache
should reach at least 95% of that limit. The share is timed inside the online step (a separate pass,
so the timing's synchronisation does not slow the timed online steps).

    python -m bench.bench_pretrain --size cpu     # base proportions scaled down, then the demo's pair; CPU
    python -m bench.bench_pretrain --size gpu     # ViT-B/16 at 224 px + BEiT v1's dVAE at 112 px, bf16
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from bench.common import emit, size_parser
from pipeline.config import to_dict

_DEMO_VIT = dict(dim=128, depth=4, heads=4, patch=8, drop_path=0.0, layer_scale=0.1)
SIZES: dict[str, list[dict[str, Any]]] = {
    "cpu": [
        # BEiT v1's proportions, scaled down: the tokenizer sees the image at half resolution (as the
        # dVAE sees 112 px of 224) and its forward costs about a ViT forward (~1/4-1/3 of a training
        # step; the measured share is reported)
        dict(variant="base-proportions", img=64, n=256, batch=64, warmup=2, steps=10, repeats=3, model=_DEMO_VIT,
             num_masked=26, min_block=4,
             tok=dict(kind="dvae", vocab_size=256, grid=8, input_size=32, width=48, depth=2, code_dim=32)),
        # the demo pair: pretrain/recipes/demo.yaml's model, the packaged demo tokenizer
        # (tokenizer/recipes/demo.yaml: a VQ-KD ViT at 64 px)
        dict(variant="demo", img=64, n=256, batch=64, warmup=2, steps=10, repeats=3, model=_DEMO_VIT,
             num_masked=26, min_block=4, tok="recipe:demo"),
    ],
    "gpu": [
        # BEiT v1 base: ViT-B/16 at 224 px and tokenizer/recipes/dvae_base.yaml (vocab 8192, 14x14 at 112 px)
        dict(variant="base", img=224, n=1024, batch=128, warmup=5, steps=30, repeats=3,
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

        return load_config(TokenizerTrainConfig, spec.split(":", 1)[1], stage="tokenizer").model
    return TokenizerConfig(**spec)


def setup(s: dict[str, Any], workdir: str, device: torch.device, targets=("tokens", "tokens-online")):
    """A saved tokenizer, a real cache made with it, and in-memory batches per target from the real loader."""
    from pretrain.data import SampleTransform, make_dataset, make_loader
    from pretrain.masking import make_masker
    from pretrain.synthetic import write_cache
    from tokenizer.base import build_tokenizer, load_tokenizer, save_tokenizer

    torch.manual_seed(0)
    tok_dir = os.path.join(workdir, "tokenizer")
    tcfg = tokenizer_config(s["tok"])
    save_tokenizer(build_tokenizer(tcfg), tok_dir)
    tok = load_tokenizer(tok_dir, map_location=device)
    cache = os.path.join(workdir, "tokens", tok.tokenizer_id)
    write_cache(cache, tok, f"shapes?n={s['n']}&size={s['img']}&seed=1", [s["n"]])
    grid = (s["img"] // s["model"]["patch"],) * 2
    masker = make_masker("block", grid, s["num_masked"], min_block=s["min_block"])
    from pipeline.shards import check_cache, shard_urls

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


def measure(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from pretrain.loop import train_step
    from pretrain.model import MIMModel, ModelConfig
    from pretrain.optim import OptimConfig, make_optimizer, make_scheduler

    gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as workdir:
        tok, batches, _, _ = setup(s, workdir, device)
        torch.manual_seed(0)
        model = MIMModel(ModelConfig(**s["model"]), s["img"], "tokens", tok.vocab_size).to(device)
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
    # per-step times, lower quartile: robust to other processes stealing cores for a while
    q = lambda xs: float(np.quantile(xs, 0.25))  # noqa: E731
    cached_ips, online_ips = s["batch"] / q(cached), s["batch"] / q(online)
    online_step_s = q(online)
    share = q(tok_s) / online_step_s
    limit = 1.0 / (1.0 - share) if share < 1 else float("inf")
    ratio = cached_ips / online_ips
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
        "size": "gpu" if gpu else "cpu",
        "sizes": {"img": s["img"], "batch": s["batch"], "steps": s["steps"], "model": s["model"],
                  "tokenizer": {k: v for k, v in to_dict(tokenizer_config(s["tok"])).items()
                                if k in ("kind", "vocab_size", "grid", "input_size", "width", "depth", "code_dim")},
                  "num_masked": s["num_masked"]},
        "device": str(device),
        "dtype": "bf16 autocast" if gpu else "fp32",
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = size_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    gpu = args.size == "gpu"
    if gpu and not torch.cuda.is_available():
        print("bench_pretrain: --size gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if gpu else "cpu")
    for spec in SIZES[args.size]:
        emit(measure(spec, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
