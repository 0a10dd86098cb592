"""FAISS code assignment against torch brute force, and the codebook report's runtime per million tokens.

    python -m bench.bench_faiss --size cpu      # or: gpu (1M x 8192 x 32 on the GPU)

Vectors are drawn near the codes (x = normalise(c_j + noise), cosine to their code ~0.75, as encoder
outputs sit near a VQ-KD codebook), both sides l2-normalised, so nearest-by-L2 = nearest-by-cosine.

* ``faiss_assign``: figure = vectors/s of faiss ``IndexFlatL2`` (k=1, exact; on the GPU when faiss
  has one); reference = vectors/s of torch ``cdist`` + ``argmin`` in chunks of 4096 rows (fair: every
  thread, no N×K matrix larger than a chunk; on CUDA at gpu size). ratio = figure / reference, target >= 3.
  ``agreement`` is the share of ids equal to the torch answer (ties aside, 1.0).
* ``faiss_options``: other ways, each as a ratio to the same torch reference's rate, with recall@1
  against the exact answer: faiss IndexFlatIP, torch matmul + argmax (a stronger brute force), IVF-Flat
  and HNSW; run on the first quarter of the vectors to keep the cpu size near a minute.
* ``codebook_report``: figure = the whole cache-only report's seconds per million tokens (Ray started
  before the clock; scan, mosaic, figures, parquet, HTML); reference = a bare serial scan (read every
  shard, np.bincount) in seconds per million tokens; ratio = figure / reference (the report's cost in
  bare scans; below 1 when Ray's parallel scan beats one process). No target in the issue.

One JSON line per figure (see bench/common.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit  # noqa: E402

SIZES = {
    "cpu": {"vectors": 100_000, "codes": 8192, "dim": 32, "report_shards": 8, "report_images": 2000, "grid": 14},
    "gpu": {"vectors": 1_000_000, "codes": 8192, "dim": 32, "report_shards": 32, "report_images": 32_000, "grid": 14},
}


def make_data(n: int, k: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((k, d), dtype=np.float32)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    x = codes[rng.integers(0, k, n)] + 0.15 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, codes


def torch_assign(x: np.ndarray, codes: np.ndarray, device: str, how: str = "cdist", chunk: int = 4096) -> np.ndarray:
    import torch

    xt, ct = torch.from_numpy(x).to(device), torch.from_numpy(codes).to(device)
    out = torch.empty(x.shape[0], dtype=torch.long, device=device)
    with torch.inference_mode():
        for i in range(0, x.shape[0], chunk):
            block = xt[i : i + chunk]
            out[i : i + chunk] = torch.cdist(block, ct).argmin(1) if how == "cdist" else (block @ ct.T).argmax(1)
    if device == "cuda":
        torch.cuda.synchronize()
    return out.cpu().numpy()


def clock(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_assign(size: dict, device: str, gpu_faiss: bool) -> list[dict]:
    import faiss

    from eval.codebook import faiss_ops

    n, k, d = size["vectors"], size["codes"], size["dim"]
    x, codes = make_data(n, k, d)
    torch_assign(x[:4096], codes, device)  # warm-up (CUDA context, kernels, allocator)
    t_ref, exact = clock(lambda: torch_assign(x, codes, device))
    ref = n / t_ref
    sizes = {"vectors": n, "codes": k, "dim": d, "threads": faiss.omp_get_max_threads(), "torch_device": device, "faiss_gpu": gpu_faiss}
    faiss_ops.nearest(x[:4096], codes, cosine=False, use_gpu=gpu_faiss)  # warm-up too (GPU resources, cuBLAS)
    t, (ids, _) = clock(lambda: faiss_ops.nearest(x, codes, cosine=False, use_gpu=gpu_faiss))
    lines = [{"bench": "faiss_assign", "figure": round(n / t, 1), "reference": round(ref, 1), "ratio": round(t_ref / t, 3),
              "target": 3.0, "unit": "vectors/s", "method": "faiss IndexFlatL2 k=1" + (" (GPU)" if gpu_faiss else ""),
              "reference_method": f"torch cdist+argmin, chunks of 4096 ({device})", "seconds": round(t, 3),
              "reference_seconds": round(t_ref, 3), "agreement": round(float((ids == exact).mean()), 6), "sizes": sizes}]

    # the options run on the first quarter of the vectors (rates are per vector, so they compare with the
    # reference's rate on all of them; it keeps the cpu size near a minute)
    m = max(1, n // 4)
    xs, exact_s = x[:m], exact[:m]

    def option(name: str, run, extra=None):
        secs, got = clock(run)
        rate = m / secs
        lines.append({"bench": "faiss_options", "option": name, "figure": round(rate, 1), "reference": round(ref, 1),
                      "ratio": round(rate / ref, 3), "target": 3.0, "unit": "vectors/s", "seconds": round(secs, 3),
                      "vectors": m, "recall_at_1": round(float((got == exact_s).mean()), 5), "sizes": sizes, **(extra or {})})

    ip = faiss_ops.flat_index(codes, "ip", use_gpu=gpu_faiss)
    option("faiss IndexFlatIP k=1", lambda: ip.search(xs, 1)[1][:, 0])
    option(f"torch matmul+argmax ({device})", lambda: torch_assign(xs, codes, device, how="mm"))
    nlist = int(np.sqrt(k))
    quant = faiss.IndexFlatL2(d)
    ivf = faiss.IndexIVFFlat(quant, d, nlist)
    build, _ = clock(lambda: (ivf.train(codes), ivf.add(codes)))
    for nprobe in (4, 16):
        ivf.nprobe = nprobe
        option(f"faiss IVFFlat nlist={nlist} nprobe={nprobe}", lambda: ivf.search(xs, 1)[1][:, 0], extra={"build_seconds": round(build, 3)})
    hnsw = faiss.IndexHNSWFlat(d, 32)
    hnsw.hnsw.efConstruction = 64
    build, _ = clock(lambda: hnsw.add(codes))
    for ef in (16, 32):
        hnsw.hnsw.efSearch = ef
        option(f"faiss HNSWFlat M=32 efSearch={ef}", lambda: hnsw.search(xs, 1)[1][:, 0], extra={"build_seconds": round(build, 3)})
    return lines


def make_report_cache(root: Path, shards: int, images: int, grid: int, k: int) -> Path:
    from pipeline.images import encode_png
    from pipeline.token_cache import encode_sample
    from pipeline.views import centre_view

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from cache_fixture import commit_shards

    rng = np.random.default_rng(0)
    cache = root / "benchtok"
    cache.mkdir(parents=True)
    p = 1.0 / np.arange(1, k + 1) ** 0.8  # a Zipf-like usage, 8% of the codebook dead
    p[int(0.92 * k) :] = 0
    p /= p.sum()
    pixels = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(16)]
    pngs = [encode_png(px) for px in pixels]
    shard_members, n, per = [], 0, images // shards
    for s in range(shards):
        members = []
        tokens = rng.choice(k, size=(per, 1, grid, grid), p=p).astype(np.uint16)
        for i in range(per):
            members.append(encode_sample(f"b{n:07d}", pngs[n % 16], "png", tokens[i], 32, 32, [centre_view(32, 32)], n % 10))
            n += 1
        shard_members.append(members)
    commit_shards(str(cache), shard_members, tokenizer_id="benchtok", kind="vqkd", vocab_size=k, grid=[grid, grid],
                  input_size=8 * grid, views=1)
    return cache


def bench_report(size: dict) -> dict:
    import ray

    from eval.codebook.report import codebook_report
    from pipeline.token_cache import decode_sample, read_shard

    work = Path(tempfile.mkdtemp(prefix="bench-faiss-"))
    try:
        cache = make_report_cache(work, size["report_shards"], size["report_images"], size["grid"], size["codes"])

        def bare():
            counts = np.zeros(size["codes"], dtype=np.int64)
            for shard in sorted(cache.glob("shard-*.tar")):
                for sample in read_shard(str(shard)):
                    counts += np.bincount(decode_sample(sample).tokens.ravel(), minlength=size["codes"])
            return counts

        t_bare, counts = clock(bare)
        tokens = int(counts.sum())
        t_ray, _ = clock(lambda: ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False))
        try:
            t_rep, rep = clock(lambda: codebook_report(str(cache), str(work / "report"), sample=0, quiet=True))
        finally:
            ray.shutdown()
        assert rep["usage"]["tokens"] == tokens
        fig, ref = t_rep / tokens * 1e6, t_bare / tokens * 1e6
        return {"bench": "codebook_report", "figure": round(fig, 3), "reference": round(ref, 3), "ratio": round(fig / ref, 3),
                "target": None, "unit": "seconds per million tokens", "reference_method": "bare serial scan (read + bincount)",
                "report_seconds": round(t_rep, 3), "ray_start_seconds": round(t_ray, 3), "phases": rep["timing"],
                "sizes": {"tokens": tokens, "shards": size["report_shards"], "images": size["report_images"],
                          "grid": size["grid"], "codes": size["codes"], "cpus": os.cpu_count()}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_faiss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--vectors", type=int, default=None, help="override the size's vector count")
    parser.add_argument("--skip-report", action="store_true", help="only the assignment figures")
    args = parser.parse_args(argv)

    import faiss
    import torch

    from eval.codebook.faiss_ops import gpu_available

    size = dict(SIZES[args.size])
    if args.vectors:
        size["vectors"] = args.vectors
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    device = "cuda" if args.size == "gpu" and torch.cuda.is_available() else "cpu"
    gpu_faiss = args.size == "gpu" and gpu_available()
    if args.size == "gpu" and device != "cuda":
        print("bench_faiss: --size gpu needs a CUDA device", file=sys.stderr)
        return 2
    if args.size == "gpu" and not gpu_faiss:
        print("bench_faiss: faiss has no GPU here (install faiss-gpu): faiss runs on the CPU against torch on CUDA", file=sys.stderr)
    for line in bench_assign(size, device, gpu_faiss):
        emit(line)
    if not args.skip_report:
        emit(bench_report(size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
