"""Evaluation feature extraction: the Ray path's images/s against the encoders' raw rate, same run.

    python -m bench.bench_eval --size cpu      # or: gpu

* ``reference``: images/s of ``compute_features`` alone, for both encoders (pretrained and the
  random-init baseline), on centre views decoded beforehand into memory (all of this process's
  threads, or the GPU); measured before and after the Ray run, the faster kept.
* ``figure``: images/s of ``eval.feature_job.extract_features`` for both encoders over a JPEG folder:
  actors started, every image decoded once, both encoders run, parts written, gathered and committed
  to the feature cache. Ray itself is started before the clock.
* ``ratio`` = figure / reference; the target is >= 0.8 (decode, parts and actor start-up cost <= 20%).

Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {
    # a ViT-Ti-like encoder at 112 px on CPU; ViT-B/16 at 224 px on GPU
    "cpu": {"images": 512, "image_px": 128, "img_size": 112, "patch": 16, "dim": 192, "depth": 12, "heads": 3,
            "batch_size": 64},
    "gpu": {"images": 12288, "image_px": 256, "img_size": 224, "patch": 16, "dim": 768, "depth": 12, "heads": 12,
            "batch_size": 256},
}


def write_bench_encoder(path: Path, size: dict) -> str:
    """An encoder export (config.json + model.safetensors) with random weights: cost does not depend on them."""
    import timm.models.beit as beit
    import torch
    from safetensors.torch import save_file

    from pretrain.model import ModelConfig, encoder_kwargs

    path.mkdir(parents=True, exist_ok=True)
    kwargs = encoder_kwargs(ModelConfig(dim=size["dim"], depth=size["depth"], heads=size["heads"],
                                        patch=size["patch"]), size["img_size"])
    torch.manual_seed(0)
    model = beit.Beit(**kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    cfg = {"architecture": "beit", "timm_kwargs": kwargs, "img_size": size["img_size"], "patch_size": size["patch"],
           "mean": [0.5] * 3, "std": [0.5] * 3, "source_checkpoint": "bench"}
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def reference_rate(encoders: list, spec: str, batch_size: int) -> float:
    """Both encoders on pixels decoded beforehand: only ``compute_features`` is timed (after a warm-up)."""
    import torch

    from eval.features import compute_features, load_labelled_images

    imgs = load_labelled_images(spec, encoders[0].img_size)
    for enc in encoders:
        compute_features(enc, imgs.pixels[:batch_size], batch_size=batch_size)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for enc in encoders:
        compute_features(enc, imgs.pixels, batch_size=batch_size)  # returns host arrays: synchronised
    return len(imgs) / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.bench_cache import make_images
    from bench.common import emit, size_parser

    parser = size_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="override the size's image count")
    args = parser.parse_args(argv)

    import ray
    import torch

    from eval.feature_job import extract_features
    from eval.features import load_encoder, random_encoder

    if args.size == "gpu" and not torch.cuda.is_available():
        print("bench_eval: --size gpu needs a CUDA device", file=sys.stderr)
        return 2
    size = dict(SIZES[args.size])
    if args.images:
        size["images"] = args.images
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        folder = make_images(work / "images" / "shapes", size["images"], size["image_px"])
        spec = folder.replace(str(work / "images" / "shapes"), str(work / "images"))  # one class folder: labelled
        pretrained = load_encoder(write_bench_encoder(work / "encoder", size))
        # seed 1: write_bench_encoder seeds 0, and equal weights would give both encoders one cache entry
        encoders = [pretrained, random_encoder(pretrained, 1)]
        before = reference_rate(encoders, spec, size["batch_size"])
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, configure_logging=False)
        try:
            t0 = time.perf_counter()
            out = extract_features(encoders, spec, cache_dir=str(work / "cache"), batch_size=size["batch_size"],
                                   log=lambda msg: print(f"bench_eval: {msg}", file=sys.stderr))
            seconds = time.perf_counter() - t0
        finally:
            ray.shutdown()
        fs = out["pretrained"]
        assert not fs.cached and len(fs.keys) == size["images"]
        after = reference_rate(encoders, spec, size["batch_size"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figure, reference = len(fs.keys) / seconds, max(before, after)
    stats = fs.stats
    emit({
        "bench": "eval_features",
        "figure": round(figure, 2),
        "reference": round(reference, 2),
        "ratio": round(figure / reference, 3),
        "target": 0.8,
        "unit": "images/s (both encoders)",
        "sizes": {"size": args.size, **size, "dim_out": int(fs.features.shape[1])},
        "run": {
            "seconds": round(seconds, 2),
            "actors": stats.get("actors"),
            "actor_startup_seconds": round(stats.get("startup_s", 0.0), 2),
            "steady_images_per_s": round(len(fs.keys) / stats["extract_s"], 2) if stats.get("extract_s") else None,
            "reference_before_after": [round(before, 2), round(after, 2)],
        },
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
