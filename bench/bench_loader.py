"""Loader throughput (token-cache shards → masked batches) per loader process vs what a step consumes.

One loader process (``workers=0``: in this process) runs the real pipeline: webdataset over the cache,
shuffle buffer, decode the source bytes, rebuild the cached view with ``render_view``, normalise,
draw a blockwise mask, batch. Its images/s, times the recipe's loader processes, should be at least
3× what the training step consumes (``pretrain.loop.train_step`` on the same batches), so the step,
not the loader, sets the pace. Also: blockwise masks/s, and their share of the loader's time, and the
cost of ``data.verify_shards`` (each shard's sha256 checked as it is opened): the loader's images/s
with it over without, in one run.

    python -m bench.bench_loader --size cpu     # the demo: 64 px, 8x8 grid, 26 masked, 1 loader process
    python -m bench.bench_loader --size gpu     # BEiT base: 224 px, 14x14 grid, 75 masked, 8 loader processes
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

from bench.bench_pretrain import SIZES, setup
from bench.common import emit, size_parser

LOADER_WORKERS = {"cpu": 1, "gpu": 8}  # the demo / base recipes' data.loader_workers


def loader_rate(urls: list[str], masker, s: dict[str, Any], batches: int, sha256: dict[str, str] | None = None,
                vocab_size: int | None = None) -> float:
    from pretrain.data import SampleTransform, make_dataset, make_loader

    t = SampleTransform(img_size=s["img"], masker=masker, target="tokens", vocab_size=vocab_size)
    ds = make_dataset(urls, t, s["batch"], shuffle_buffer=512, sha256=sha256)
    it = iter(make_loader(ds, batches + 2, workers=0))
    next(it), next(it)  # fill the shuffle buffer, warm caches
    times = []
    while True:  # per batch, lower quartile: robust to other processes stealing the cores for a while
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            break
        times.append((time.perf_counter() - t0) / b["image"].shape[0])
    return 1.0 / float(np.quantile(times, 0.25))


def measure(size: str, device: torch.device) -> dict[str, Any]:
    s = SIZES[size][0]
    from pretrain.loop import train_step
    from pretrain.model import MIMModel, ModelConfig
    from pretrain.optim import OptimConfig, make_optimizer, make_scheduler

    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as workdir:
        tok, batches, urls, masker = setup(s, workdir, device, targets=("tokens",))
        n = 16 if size == "cpu" else 24
        per_worker = loader_rate(urls, masker, s, batches=n, vocab_size=tok.vocab_size)
        from pipeline.token_cache import check_cache

        _, rows = check_cache(os.path.dirname(urls[0]))
        sha = {u: r["sha256"] for u, r in zip(urls, rows)}
        verified = loader_rate(urls, masker, s, batches=n, sha256=sha, vocab_size=tok.vocab_size)

    rng = np.random.default_rng(0)
    chunks = []
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(200):
            masker(rng)
        chunks.append((time.perf_counter() - start) / 200)
    masks_per_s = 1.0 / float(np.quantile(chunks, 0.25))

    torch.manual_seed(0)
    model = MIMModel(ModelConfig(**s["model"]), s["img"], "tokens", tok.vocab_size).to(device).train()
    ocfg = OptimConfig(lr=1e-4)
    opt = make_optimizer(model, ocfg, fused=gpu)
    sched = make_scheduler(opt, ocfg, 10**6, 0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    bs = batches["tokens"]
    mean = std = torch.full((3,), 0.5, device=device)
    for b in bs[: s["warmup"]]:
        train_step(model, opt, sched, b, device, mean=mean, std=std, autocast=autocast, clip=3.0)
    step_times = []
    for _ in range(2):
        for b in bs[s["warmup"]:]:
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(model, opt, sched, b, device, mean=mean, std=std, autocast=autocast, clip=3.0)
            if gpu:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
    step_rate = s["batch"] / float(np.quantile(step_times, 0.25))

    workers = LOADER_WORKERS[size]
    ratio = per_worker * workers / step_rate
    return {
        "bench": "pretrain_loader_vs_step",
        "figure": round(per_worker * workers, 1),
        "reference": round(step_rate, 1),
        "unit": "images/s",
        "ratio": round(ratio, 2),
        "target": 3.0,
        "loader_images_per_s_per_worker": round(per_worker, 1),
        "loader_workers": workers,
        "workers_for_3x": int(np.ceil(3 * step_rate / per_worker)),
        "loader_images_per_s_verify_shards": round(verified, 1),
        "verify_shards_ratio": round(verified / per_worker, 3),  # <1: the sha256 check's cost
        "block_masks_per_s": round(masks_per_s, 1),
        "mask_share_of_loader_time": round(per_worker / masks_per_s, 4),
        "size": size,
        "sizes": {"img": s["img"], "batch": s["batch"], "grid": [masker.height, masker.width],
                  "num_masked": s["num_masked"], "min_block": s["min_block"], "model": s["model"]},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = size_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    gpu = args.size == "gpu"
    if gpu and not torch.cuda.is_available():
        print("bench_loader: --size gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    emit(measure(args.size, torch.device("cuda" if gpu else "cpu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
