"""The agreement check: rebuild the cached views of a sample of images, re-encode them, re-assign the
encoder's features to the codebook with FAISS (``tok.encode`` for a dVAE), and compare with the cached
tokens. A fresh cache agrees 100% (up to float ties); a stale or corrupt one shows here, per shard."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from eval.codebook import faiss_ops, scan
from eval.codebook.ray_util import gather, remote
from pipeline.token_cache import CacheError


def pick_agreement_shards(rows: list[dict[str, Any]], sample: int, max_shards: int = 8) -> list[tuple[int, int]]:
    """(shard index, samples to take) spread evenly over the cache, about ``sample`` images in all."""
    n = len(rows)
    m = max(1, min(n, max_shards))
    order = list(dict.fromkeys([int(round(x)) for x in np.linspace(0, n - 1, m)] + list(range(n))))
    per = max(1, math.ceil(sample / m))
    out, total = [], 0
    for i in order:
        if total >= sample:
            break
        take = min(per, int(rows[i]["samples"]), sample - total)
        if take > 0:
            out.append((i, take))
            total += take
    return out


def run_agreement(tok, tokenizer_dir: str, urls: list[str], rows: list[dict[str, Any]], sample: int, quiet: bool, use_gpu: bool | None = None) -> dict[str, Any]:
    from pipeline.ray_context import cluster_has_gpu

    picks = pick_agreement_shards(rows, sample)
    gpu = cluster_has_gpu()  # encode on a GPU when the cluster has one (as the cache build does)
    task = remote(scan.encode_sample_of_shard, num_cpus=1, num_gpus=1 if gpu else 0)
    refs = [task.remote(urls[i], tokenizer_dir, take, device="cuda" if gpu else "cpu") for i, take in picks]
    results: list[Any] = [None] * len(refs)

    def on_result(i: int, r: dict[str, Any]) -> None:
        results[i] = r

    gather(refs, on_result, "agreement", quiet)
    results = [r for r in results if r.get("cached") is not None]
    if not results:
        raise CacheError("no cached images to check agreement on")
    cached = np.concatenate([r["cached"] for r in results])
    out: dict[str, Any] = {}
    if "features" in results[0]:
        feats = np.concatenate([r["features"] for r in results])
        codebook = np.asarray(tok.codebook().detach().cpu().numpy(), dtype=np.float32)
        cosine = faiss_ops.is_normalised(codebook)  # VQ-KD: cosine look-up on an l2-normalised codebook
        flat = feats.reshape(-1, feats.shape[-1])
        ids, scores = faiss_ops.nearest(flat, codebook, cosine=cosine, use_gpu=use_gpu)
        assigned = ids.reshape(cached.shape)
        gpu = faiss_ops.gpu_available() if use_gpu is None else use_gpu
        out["method"] = ("faiss-cosine" if cosine else "faiss-l2") + ("-gpu" if gpu else "")
        if cosine:
            out["mean_cosine_to_code"] = float(scores.mean())
            # margin to the second-best code (how fragile the assignment is), on at most 20k vectors
            sub = flat[:: max(1, flat.shape[0] // 20000)]
            if codebook.shape[0] > 1:
                top2, _ = faiss_ops.assign(faiss_ops.l2_normalise(sub), codebook, "ip", k=2, use_gpu=use_gpu)
                margin = top2[:, 0] - top2[:, 1]
                out["mean_margin"] = float(margin.mean())
                out["low_margin_fraction"] = float((margin < 0.01).mean())
    else:
        assigned = np.concatenate([r["encoded"] for r in results]).reshape(cached.shape)
        out["method"] = "tokenizer.encode"
    equal = assigned == cached
    per_shard, start = [], 0
    for r in results:
        n = r["cached"].shape[0]
        per_shard.append({"shard": r["shard"].rsplit("/", 1)[-1], "agreement": float(equal[start : start + n].mean())})
        start += n
    return {
        "agreement": float(equal.mean()),
        **out,
        "images": int(sum(r["images"] for r in results)),
        "views": int(cached.shape[0]),
        "tokens": int(equal.size),
        "views_fully_equal": float(equal.all(axis=1).mean()),
        "shards_checked": len(results),
        "worst_shard_agreement": min(p["agreement"] for p in per_shard),
        "per_shard": per_shard,
    }
