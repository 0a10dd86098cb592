"""Token-cache build throughput against the tokenizer's raw batched encode, same machine, same data.

    python bench/bench_cache.py --size cpu      # or: gpu
    python bench/bench_cache.py --size cpu --model dall-e --views 2             # the imported DALL-E (112 px)
    python bench/bench_cache.py --size cpu --model beitv2-vqkd --views 2 --codebook-report  # the imported VQ-KD (224 px)

* ``reference``: images/s of ``tok.encode`` alone over batches of views pre-rendered in memory (all
  of this process's threads on CPU, or the GPU); measured before and after the build, the faster kept.
* ``figure``: images/s of the whole ``build_cache`` job on those images (a JPEG folder): Ray actors
  started, source read, every image decoded once, views rendered, encoded, tars written and hashed,
  records, manifest. Ray itself is started before the clock.
* ``ratio`` = figure / reference; the target is >= 0.8 (decode, views and tar writing cost <= 20%).
  On CPU, ``build.strict_ratio`` compares with one thread's encode rate times the cores instead
  (perfect scaling), which a one-process multi-threaded encode rarely reaches.

Prints one JSON line. ``breakdown`` is a single-process profile of the per-image stages (seconds per
image), to see where the rest goes.

``--model dall-e`` / ``beitv2-vqkd``: the released architectures (``tokenizer/released/``) with the released
shapes and random weights, at their own input size, with their paper's views (``--style``: crop scale,
jitter 0.4, Lanczos / bicubic tokenizer side; jitter shows with ``--views`` > 1). ``--codebook-report`` then
also times ``mimflow codebook report`` (with the tokenizer: FAISS agreement on re-encoded views) on the
cache just built, as a second line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
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
    # images, source pixels, tokenizer input pixels, batch size
    "cpu": {"images": 128, "image_px": 160, "input_size": 112, "batch_size": 32, "views": 1},
    "gpu": {"images": 12288, "image_px": 288, "input_size": 224, "batch_size": 256, "views": 1},
}


def make_images(root: Path, n: int, px: int) -> str:
    """``n`` JPEGs (the shapes generator at ``px``), a folder source with ~8 partitions."""
    from PIL import Image

    from pipeline.shapes import render_shape

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels, _ = render_shape(i, size=px, seed=0, split="train")
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        (root / f"img{i:06d}.jpg").write_bytes(buf.getvalue())
    return f"{root}?partition_size={max(16, n // 8)}"


MODELS = {
    # a BEiT-style dVAE (8x8-pixel patches, vocab 8192) at the size's input resolution
    "dvae": lambda size: dict(kind="dvae", vocab_size=8192, grid=size // 8, input_size=size, width=64, depth=2),
    # the VQ-KD demo recipe's tokenizer (tokenizer/recipes/vqkd_demo.yaml): cheap to encode, so the
    # cache's own costs (decode, views, tars, actor start) weigh the most
    "vqkd-demo": lambda size: dict(kind="vqkd", vocab_size=256, grid=8, input_size=64, width=64, depth=2,
                                   num_heads=4, mlp_ratio=2.0, code_dim=32, mean=(0.5,) * 3, std=(0.5,) * 3),
    # OpenAI's DALL-E encoder as released (encoder.pkl: n_hid 256, 2 blocks per group, vocab 8192) at
    # BEiT v1's 112 px, no decoder; what `mimflow tokenizer import dalle-dvae` builds
    "dall-e": lambda size: dict(kind="dvae", arch="dall-e", vocab_size=8192, grid=14, input_size=112,
                                mean=(-0.125,) * 3, std=(1.25,) * 3, width=256, depth=2, code_dim=1,
                                decoder_width=0, decoder_depth=0),
    # BEiT v2's VQ-KD encoder as released (ViT-B/16 at 224 px, 8192 codes of 32 dims)
    "beitv2-vqkd": lambda size: dict(kind="vqkd", arch="beitv2", vocab_size=8192, grid=14, input_size=224,
                                     mean=(0.5,) * 3, std=(0.5,) * 3, width=768, depth=12, num_heads=12,
                                     mlp_ratio=4.0, code_dim=32),
}
# the papers' views (pipeline.views.ViewStyle fields) per model: beit/datasets.py, beit2 PRETRAINING.md
STYLES = {
    "default": {},
    "beit": {"scale": (0.08, 1.0), "jitter": 0.4, "interp": "bicubic", "tok_interp": "lanczos"},
    "beitv2": {"scale": (0.2, 1.0), "jitter": 0.4, "interp": "bicubic", "tok_interp": "bicubic"},
}
MODEL_STYLE = {"dall-e": "beit", "beitv2-vqkd": "beitv2"}
CPU_IMAGES = {"dall-e": 16, "beitv2-vqkd": 24}  # --size cpu: a row in under 3 minutes on 2 cores


def make_bench_tokenizer(path: Path, model: str, input_size: int) -> str:
    """A tokenizer with random weights (encode cost does not depend on training)."""
    import torch

    from tokenizer.base import TokenizerConfig
    from tokenizer.checkpoint import build_tokenizer, save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(TokenizerConfig(**MODELS[model](input_size))), path)
    return str(path)


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def reference_rate(tok_dir: str, spec: str, views: int, batch_size: int, device: str, style=None) -> tuple[float, dict]:
    """Raw batched encode: views rendered beforehand, only ``encode`` timed (after a warm-up)."""
    import numpy as np
    import torch

    from pipeline.sources import open_source
    from tokenizer.cache_worker import _prepare
    from tokenizer.checkpoint import load_tokenizer

    tok = load_tokenizer(tok_dir)
    tok = tok.to(device).eval()
    items = list(open_source(spec))
    t0 = time.perf_counter()
    prepared = [_prepare(it, views, 0, int(tok.input_size), style) for it in items]
    prep_s = time.perf_counter() - t0
    pixels = np.concatenate([p.pixels for p in prepared])
    batches = [
        torch.from_numpy(pixels[i : i + batch_size]).permute(0, 3, 1, 2).float().div_(255.0).to(device)
        for i in range(0, len(pixels), batch_size)
    ]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        tok.encode(batches[0])  # warm-up (allocator, kernels)
        sync()
        t0 = time.perf_counter()
        for b in batches:
            tok.encode(b)
        sync()
        encode_s = time.perf_counter() - t0

    from pipeline.token_cache import encode_sample, shard_bytes

    t0 = time.perf_counter()
    tokens = np.zeros((views, *tok.grid), np.uint16)
    samples = [encode_sample(p.key, p.data, p.fmt, tokens, p.width, p.height, p.views, p.label) for p in prepared]
    shard_bytes(samples)
    write_s = time.perf_counter() - t0
    n = len(items)
    breakdown = {
        "decode_and_views_s_per_image": prep_s / n,
        "encode_s_per_image": encode_s / n,
        "sample_and_tar_s_per_image": write_s / n,
    }
    return n / encode_s, breakdown


def build_rate(tok_dir: str, spec: str, out: str, views: int, batch_size: int, actors: int | None,
               style=None) -> tuple[float, dict]:
    import ray

    from tokenizer.precompute import build_cache

    t0 = time.perf_counter()
    report = build_cache(tok_dir, spec, out, views, batch_size=batch_size, num_actors=actors, progress_every=30.0,
                         style=style)
    seconds = time.perf_counter() - t0
    assert report.encoded == report.partitions, "the bench cache must be built from scratch"
    res = ray.cluster_resources()
    return report.samples / seconds, {
        "build_seconds": round(seconds, 2),
        "actor_startup_seconds": round(report.startup_s, 2),
        "steady_images_per_s": round(report.images / report.encode_s, 2) if report.encode_s else None,
        "samples": report.samples,
        "ray_cpus": res.get("CPU"),
        "ray_gpus": res.get("GPU", 0),
    }


def codebook_report_line(tok_dir: str, out_root: str, report_dir: Path) -> dict:
    """``codebook_report`` with the tokenizer on the cache just built (Ray already started): seconds per
    million tokens against a bare serial scan (read every shard, bincount), as bench_faiss measures it."""
    import numpy as np

    from eval.codebook.report import codebook_report
    from pipeline.token_cache import check_cache, decode_sample, read_shard, shard_urls
    from tokenizer.checkpoint import tokenizer_id

    cache = str(Path(out_root) / tokenizer_id(tok_dir))
    info, rows = check_cache(cache)
    t0 = time.perf_counter()
    counts = np.zeros(info.vocab_size, np.int64)
    for url in shard_urls(cache, rows):
        for sample in read_shard(url):
            counts += np.bincount(decode_sample(sample).tokens.ravel(), minlength=info.vocab_size)
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = codebook_report(cache, str(report_dir), tokenizer_dir=tok_dir, sample=16, quiet=True)
    seconds = time.perf_counter() - t0
    tokens = int(counts.sum())
    assert rep["usage"]["tokens"] == tokens
    fig, ref = seconds / tokens * 1e6, bare / tokens * 1e6
    return {"bench": "codebook_report_imported", "figure": round(fig, 3), "reference": round(ref, 3),
            "ratio": round(fig / ref, 3), "target": None, "unit": "seconds per million tokens",
            "report_seconds": round(seconds, 2), "tokens": tokens, "phases": rep.get("timing"),
            "usage": {k: rep["usage"].get(k) for k in ("codes_used", "used_fraction", "perplexity")},
            "agreement": rep.get("agreement", {}).get("agreement"), "kind": info.kind, "vocab": info.vocab_size}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="dvae", help="tokenizer to encode with")
    parser.add_argument("--images", type=int, default=None, help="override the size's image count")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--actors", type=int, default=None, help="cache actors (default: the build's default)")
    parser.add_argument("--views", type=int, default=None)
    parser.add_argument("--style", choices=sorted(STYLES), default=None,
                        help="views drawn as in this paper (default: the model's paper for the released ones)")
    parser.add_argument("--codebook-report", action="store_true",
                        help="also time the codebook report (with the tokenizer) on the cache built")
    parser.add_argument("--workdir", default=None, help="keep data and caches here (default: a temp dir)")
    parser.add_argument("--json-out", default=None, help="also append the JSON line to this file")
    args = parser.parse_args(argv)

    import ray
    import torch

    from pipeline.views import ViewStyle

    size = dict(SIZES[args.size])
    if args.size == "cpu" and args.model in CPU_IMAGES:
        size["images"] = CPU_IMAGES[args.model]
    style_name = args.style or MODEL_STYLE.get(args.model, "default")
    style = ViewStyle(**STYLES[style_name])
    report_line = None
    for k in ("images", "batch_size", "actors", "views"):
        if getattr(args, k, None) is not None:
            size[k] = getattr(args, k)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size == "gpu" and device != "cuda":
        print("bench_cache: --size gpu needs a CUDA device", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        spec = make_images(work / "images", size["images"], size["image_px"])
        tok_dir = make_bench_tokenizer(work / "tokenizer", args.model, size["input_size"])
        size["input_size"] = json.loads((Path(tok_dir) / "config.json").read_text())["input_size"]
        before, breakdown = reference_rate(tok_dir, spec, size["views"], size["batch_size"], device, style)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, configure_logging=False)
        try:
            out = work / f"cache-{time.time_ns()}"
            figure, extra = build_rate(tok_dir, spec, str(out), size["views"], size["batch_size"], size.get("actors"),
                                       style)
            if args.codebook_report:
                report_line = codebook_report_line(tok_dir, str(out), work / "report")
        finally:
            ray.shutdown()
        # Measured again after the build, and the better of the two kept: a shared machine's load
        # drifts, and the conservative reference is the faster one.
        after, _ = reference_rate(tok_dir, spec, size["views"], size["batch_size"], device, style)
        reference = max(before, after)
        extra["reference_before_after"] = [round(before, 2), round(after, 2)]
        if device == "cpu":
            # A stricter CPU reference: one thread's encode rate times the cores, i.e. perfect scaling.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                one, _ = reference_rate(tok_dir, spec, size["views"], size["batch_size"], device, style)
            finally:
                torch.set_num_threads(threads)
            cores = os.cpu_count() or 1
            extra["strict_reference"] = round(one * cores, 2)
            extra["strict_ratio"] = round(figure / (one * cores), 3)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    line = {
        "bench": "cache_build",
        "figure": round(figure, 2),
        "reference": round(reference, 2),
        "ratio": round(figure / reference, 3),
        "target": 0.8,
        "unit": "images/s",
        "sizes": {"size": args.size, "model": args.model, "style": style_name, **size},
        "machine": machine(),
        "build": extra,
        "breakdown": {k: round(v, 6) for k, v in breakdown.items()},
    }
    for row in (line, report_line):
        if row is None:
            continue
        text = json.dumps(row)
        print(text, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
