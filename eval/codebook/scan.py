"""Per-shard work of the report, run as Ray tasks: token histograms, patch look-ups, re-encoding.

Each function takes a shard location (local path or URI) and returns plain numpy/dict results, so it
runs the same in a Ray worker, in a test, or inline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.token_cache import decode_sample, read_shard

# Occurrence records: code, sample index in the shard, view, row, column.
OCC_FIELDS = 5


def scan_shard(shard: str, vocab_size: int, occurrences: int = 4) -> dict[str, Any]:
    """Histogram of one shard, per-label histograms (sparse), and where each code occurs.

    ``occ``: int32 [n, 5] rows (code, sample, view, y, x), at most ``occurrences`` per code, each from
    a different sample, so that a mosaic can show several images per code without rescanning.
    """
    samples = read_shard(shard)
    parts, sizes, sample_labels, grids, views = [], [], [], set(), 0
    for sample in samples:
        cs = decode_sample(sample)  # the image bytes stay undecoded
        tokens = cs.tokens
        grids.add(tuple(int(x) for x in tokens.shape[1:]))
        views += tokens.shape[0]
        parts.append(tokens.ravel())
        sizes.append(tokens.size)
        sample_labels.append(-1 if cs.label is None else cs.label)
    # one pass over the shard's tokens, not one histogram per sample
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(samples)), sizes)
    valid = flat < vocab_size
    out_of_range = int((~valid).sum())
    counts = np.bincount(flat[valid], minlength=vocab_size).astype(np.int64)
    labels: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    token_label = np.asarray(sample_labels, dtype=np.int64)[owner] if len(samples) else np.zeros(0, dtype=np.int64)
    keep = valid & (token_label >= 0)
    if keep.any():
        keys, key_counts = np.unique(token_label[keep] * vocab_size + flat[keep], return_counts=True)
        lab, code = np.divmod(keys, vocab_size)
        bounds = np.flatnonzero(np.diff(lab)) + 1
        for l_part, c_part, n_part in zip(np.split(lab, bounds), np.split(code, bounds), np.split(key_counts, bounds)):
            labels[int(l_part[0])] = (c_part.astype(np.int32), n_part.astype(np.int64))
    occ = np.zeros((0, OCC_FIELDS), dtype=np.int32)
    if occurrences > 0 and flat.size and not out_of_range and len(grids) == 1:
        occ = _first_occurrences(flat, owner, samples, occurrences, next(iter(grids)))
    return {
        "shard": shard,
        "samples": len(samples),
        "views": views,
        "tokens": int(counts.sum()),
        "counts": counts,
        "labels": labels,
        "grids": sorted(grids),
        "out_of_range": out_of_range,
        "occ": occ,
    }


def _first_occurrences(flat: np.ndarray, owner: np.ndarray, samples: list, m: int, grid: tuple[int, int]) -> np.ndarray:
    """For every code present: its first occurrence in each of up to ``m`` different samples."""
    n_samples = len(samples)
    pair = flat * n_samples + owner
    _, first = np.unique(pair, return_index=True)  # sorted by (code, sample)
    codes = flat[first]
    starts = np.searchsorted(codes, codes, side="left")
    rank = np.arange(codes.size) - starts
    keep = first[rank < m]
    h, w = grid
    # offset of each position within its sample's [V, h, w] block
    sample_start = np.zeros(n_samples + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n_samples), out=sample_start[1:])
    s = owner[keep]
    within = keep - sample_start[s]
    v, rest = np.divmod(within, h * w)
    y, x = np.divmod(rest, w)
    return np.stack([flat[keep], s, v, y, x], axis=1).astype(np.int32)


def render_patches(shard: str, requests: np.ndarray, input_size: int, grid: tuple[int, int]) -> list[np.ndarray]:
    """The image patch under each (sample, view, y, x) request: the cached view rebuilt exactly as
    the tokenizer saw it (``render_view`` at ``input_size``), cut into the token grid."""
    from pipeline.images import decode_rgb  # torch-free: a patch-drawing Ray worker starts in milliseconds
    from pipeline.views import render_view

    samples = read_shard(shard)
    h, w = grid
    out: list[np.ndarray] = []
    rendered: dict[tuple[int, int], np.ndarray] = {}
    for s, v, y, x in np.asarray(requests, dtype=np.int64).reshape(-1, 4):
        if (s, v) not in rendered:
            cs = decode_sample(samples[s])
            rendered[(s, v)] = np.asarray(render_view(decode_rgb(cs.image), cs.views[v], input_size, "tokenizer"))
        img = rendered[(s, v)]
        ph, pw = img.shape[0] // h, img.shape[1] // w
        out.append(img[y * ph : (y + 1) * ph, x * pw : (x + 1) * pw].copy())
    return out


def encode_sample_of_shard(shard: str, tokenizer_dir: str, limit: int, batch_size: int = 64, device: str = "cpu") -> dict[str, Any]:
    """Rebuild the cached views of the first ``limit`` samples and run the tokenizer on them.

    Returns the cached tokens ``[n, h*w]`` and, for a tokenizer with code-space features (VQ-KD),
    the encoder's features ``[n, h*w, D]`` for FAISS re-assignment; otherwise ``tok.encode``'s
    tokens ``[n, h*w]``.
    """
    import torch

    from pipeline.images import decode_rgb
    from pipeline.tensors import to_tensor
    from pipeline.views import render_view
    from tokenizer.checkpoint import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, map_location=device)
    samples = read_shard(shard)[:limit]
    cached, images = [], []
    for sample in samples:
        cs = decode_sample(sample)
        img = decode_rgb(cs.image)
        for v, view in enumerate(cs.views):
            images.append(to_tensor(render_view(img, view, tok.input_size, "tokenizer")))
            cached.append(cs.tokens[v].astype(np.int64).ravel())
    result: dict[str, Any] = {"shard": shard, "images": len(samples), "cached": np.stack(cached) if cached else None}
    if not images:
        return result
    feats, encoded = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            batch = torch.stack(images[i : i + batch_size]).to(device)
            try:
                feats.append(tok.encode_features(batch).float().cpu().numpy())
            except NotImplementedError:
                encoded.append(tok.encode(batch).reshape(batch.shape[0], -1).cpu().numpy().astype(np.int64))
    if feats:
        result["features"] = np.concatenate(feats).astype(np.float32)
    else:
        result["encoded"] = np.concatenate(encoded)
    return result
