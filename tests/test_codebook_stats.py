"""Codebook figures against hand-computed values, and FAISS against numpy brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.codebook import faiss_ops, stats
from eval.codebook.scan import _first_occurrences

# Whole-dataset histogram used below: K = 8, codes 0..3 used 5, 2, 1, 4 times (12 tokens), 4 dead.
COUNTS = np.array([5, 2, 1, 4, 0, 0, 0, 0])


def test_usage_figures_by_hand():
    f = stats.usage_figures(COUNTS)
    h = -(5 / 12 * math.log2(5 / 12) + 2 / 12 * math.log2(2 / 12) + 1 / 12 * math.log2(1 / 12) + 4 / 12 * math.log2(4 / 12))
    assert h == pytest.approx(1.78416, abs=1e-5)  # .52626 + .43083 + .29875 + .52832, on paper
    assert f["entropy_bits"] == pytest.approx(h)
    assert f["perplexity"] == pytest.approx(2**h) and f["perplexity"] == pytest.approx(3.4442, abs=1e-4)
    assert f["perplexity_over_k"] == pytest.approx(2**h / 8)
    assert (f["codes_used"], f["dead_codes"], f["tokens"]) == (4, 4, 12)
    assert f["used_fraction"] == 0.5 and f["dead_fraction"] == 0.5
    assert f["max_entropy_bits"] == 3.0
    assert f["top1pct_codes"] == 1 and f["top1pct_share"] == pytest.approx(5 / 12)
    assert f["max_code_share"] == pytest.approx(5 / 12)
    assert f["median_count_of_used"] == 3.0


def test_extremes():
    uniform = np.full(64, 10)
    f = stats.usage_figures(uniform)
    assert f["perplexity"] == pytest.approx(64) and f["perplexity_over_k"] == pytest.approx(1.0)
    assert f["gini"] == pytest.approx(0.0, abs=1e-12) and f["dead_codes"] == 0
    assert f["top1pct_share"] == pytest.approx(1 / 64)
    one = np.zeros(64, dtype=int)
    one[7] = 100
    g = stats.usage_figures(one)
    assert g["perplexity"] == pytest.approx(1.0) and g["entropy_bits"] == 0.0
    assert g["dead_codes"] == 63 and g["top1pct_share"] == 1.0
    assert g["gini"] == pytest.approx(63 / 64)
    # top 1% of 1000 codes is 10 codes
    c = np.arange(1000)
    assert stats.top_share(c) == (10, pytest.approx(sum(range(990, 1000)) / c.sum()))


def test_js_divergence_by_hand():
    a = np.array([5, 2, 1, 0, 0, 0, 0, 0])  # a shard: 8 tokens
    p, q = a / 8, COUNTS / 12
    m = (p + q) / 2
    kl = lambda x: sum(xi * math.log2(xi / mi) for xi, mi in zip(x, m) if xi > 0)  # noqa: E731
    expected = 0.5 * kl(p) + 0.5 * kl(q)
    # on paper: m = (.52083, .20833, .10417, .16667); KL(p||m) = (5+2+1)/8 * log2(1.2) = .26303,
    # KL(q||m) = 8/12 * log2(.8) + 4/12 * log2(2) = .11872; JS = (.26303 + .11872) / 2
    assert expected == pytest.approx(0.19087, abs=1e-5)
    assert stats.js_divergence(a, COUNTS) == pytest.approx(expected)
    assert stats.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: the maximum
    assert stats.js_divergence([3, 1, 0], [6, 2, 0]) == pytest.approx(0.0, abs=1e-12)  # same shape
    drift = stats.shard_drift([a, np.array([0, 0, 0, 4, 0, 0, 0, 0])], COUNTS)
    q4 = 4 / 12  # shard B holds only code 3
    mb = np.array([5 / 24, 2 / 24, 1 / 24, (1 + q4) / 2, 0, 0, 0, 0])
    kb = 0.5 * math.log2(1 / mb[3]) + 0.5 * sum(x * math.log2(x / mm) for x, mm in zip(q, mb) if x > 0)
    assert drift == [pytest.approx(expected), pytest.approx(kb)]


def test_per_class_by_hand():
    # class 0 uses codes 0,1 (2 each); class 1 uses 0 (3), 2 (1), 3 (4)
    cc = np.array([[2, 2, 0, 0, 0, 0, 0, 0], [3, 0, 1, 4, 0, 0, 0, 0]])
    f = stats.per_class_figures(cc, ["a", "b"])
    assert [c["codes_used"] for c in f["classes"]] == [2, 3]
    assert [c["exclusive_codes"] for c in f["classes"]] == [1, 2]
    assert f["codes_exclusive_to_one_class"] == 3 and f["codes_used_by_every_class"] == 1
    joint = cc / 12
    pc, pk = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, k] * math.log2(joint[i, k] / (pc[i] * pk[k])) for i in range(2) for k in range(8) if joint[i, k])
    assert f["mutual_information_bits"] == pytest.approx(mi)
    # overlap = sum_k min(p_a, p_b): p_a = (.5, .5), p_b = (3/8, 0, 1/8, 4/8) -> 3/8
    assert f["overlap"]["matrix"] == [[1.0, 0.375], [0.375, 1.0]]
    assert f["classes"][0]["perplexity"] == pytest.approx(2.0)


def test_log_bins_and_curve():
    labels, values = stats.log_bins(np.array([0, 0, 1, 2, 3, 4, 9]))
    assert labels == ["0 (dead)", "1", "2-3", "4-7", "8-15"] and values == [2, 1, 2, 1, 1]
    curve = stats.usage_curve(COUNTS)
    assert curve["rank"][0] == 1 and curve["rank"][-1] == 8
    assert curve["frequency"][0] == pytest.approx(5 / 12) and curve["frequency"][-1] == 0.0


def test_first_occurrences_point_at_their_codes():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, size=(5, 2, 3, 4))  # 5 samples, V=2, 3x4 grid
    flat = tokens.reshape(-1)
    owner = np.repeat(np.arange(5), 24)
    occ = _first_occurrences(flat, owner, [None] * 5, 3, (3, 4))
    for code, s, v, y, x in occ:
        assert tokens[s, v, y, x] == code
    for code in range(6):
        rows = occ[occ[:, 0] == code]
        samples_with = [s for s in range(5) if (tokens[s] == code).any()]
        assert rows[:, 1].tolist() == samples_with[:3]  # distinct samples, first ones, in order


def _brute_nearest(cb):
    d = ((cb[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = d.argmin(1)
    return nn, np.sqrt(d[np.arange(len(cb)), nn])


@pytest.mark.parametrize("normalised", [True, False])
def test_faiss_nearest_codes_equal_brute_force(normalised):
    rng = np.random.default_rng(1)
    cb = rng.normal(size=(300, 16)).astype(np.float32)
    if normalised:
        cb = faiss_ops.l2_normalise(cb)
    got = faiss_ops.nearest_codes(cb, use_gpu=False)
    nn, dist = _brute_nearest(cb.astype(np.float64))
    assert np.array_equal(got["nearest"], nn)
    assert np.allclose(got["distance"], dist, atol=1e-4)
    unit = cb / np.linalg.norm(cb, axis=1, keepdims=True)
    assert np.allclose(got["cosine"], (unit * unit[nn]).sum(1), atol=1e-5)
    assert (got["nearest"] != np.arange(300)).all()


def test_faiss_assign_and_duplicates_equal_brute_force():
    rng = np.random.default_rng(2)
    cb = faiss_ops.l2_normalise(rng.normal(size=(64, 8)))
    cb[10] = cb[3]  # an exact duplicate
    cb[20] = faiss_ops.l2_normalise(cb[3:4] + 0.03 * rng.normal(size=(1, 8)))[0]
    x = faiss_ops.l2_normalise(rng.normal(size=(2000, 8)))
    scores, ids = faiss_ops.assign(x, cb, "ip", k=2, use_gpu=False, batch=512)
    sims = x @ cb.T
    assert np.allclose(scores[:, 0], sims.max(1), atol=1e-5)
    clear = np.sort(sims, 1)[:, -1] - np.sort(sims, 1)[:, -2] > 1e-5  # skip exact ties (codes 3 and 10)
    assert np.array_equal(ids[clear, 0], sims.argmax(1)[clear])
    _, l2ids = faiss_ops.assign(x, cb, "l2", use_gpu=False)
    assert np.array_equal(l2ids[clear, 0], ((x[:, None] - cb[None]) ** 2).sum(-1).argmin(1)[clear])
    pairs, cos = faiss_ops.near_duplicates(cb, 0.95)
    full = cb @ cb.T
    expected = {(i, j) for i in range(64) for j in range(i + 1, 64) if full[i, j] > 0.95}
    assert {tuple(p) for p in pairs.tolist()} == expected and (3, 10) in expected and (3, 20) in expected
    assert np.all(np.diff(cos) <= 1e-6) and cos[0] == pytest.approx(1.0, abs=1e-5)


def test_faiss_kmeans_recovers_blobs():
    rng = np.random.default_rng(3)
    centres = faiss_ops.l2_normalise(rng.normal(size=(4, 16))) * 10
    cb = np.concatenate([c + 0.1 * rng.normal(size=(25, 16)) for c in centres]).astype(np.float32)
    km = faiss_ops.kmeans(cb, 4, use_gpu=False)
    a = km["assignment"].reshape(4, 25)
    assert all(len(set(row)) == 1 for row in a) and len(set(a[:, 0])) == 4
    assert not km["spherical"] and faiss_ops.default_clusters(8192) == 91 and faiss_ops.default_clusters(16) == 4


def test_drift_by_chance():
    uniform = np.full(8, 1000)
    assert stats.drift_baseline(10**6, uniform) < 1e-4  # a big shard from the whole matches it
    assert stats.drift_baseline(8, np.full(64, 10)) > 0.3  # 8 tokens over 64 codes: far off by chance
    assert stats.drift_baseline(0, uniform) == 0.0
    assert stats.drift_baseline(50, uniform, seed=1) == stats.drift_baseline(50, uniform, seed=1)


def test_faiss_nearest_by_cosine_and_l2():
    rng = np.random.default_rng(4)
    cb = rng.normal(size=(500, 12)).astype(np.float32)
    x = (rng.normal(size=(3000, 12)) * 3).astype(np.float32)  # not normalised: cosine ignores the scale
    ids, cos = faiss_ops.nearest(x, cb, cosine=True, use_gpu=False, batch=1000)
    un = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = un(x.astype(np.float64)) @ un(cb.astype(np.float64)).T
    assert (ids == sims.argmax(1)).mean() > 0.999 and np.allclose(cos, sims.max(1), atol=1e-4)
    ids, dist = faiss_ops.nearest(x, cb, cosine=False, use_gpu=False)
    d = np.sqrt(((x[:, None, :].astype(np.float64) - cb[None]) ** 2).sum(-1))
    assert (ids == d.argmin(1)).mean() > 0.999 and np.allclose(dist, d.min(1), rtol=1e-4, atol=1e-3)


def test_patch_drawing_uses_the_one_decoder_without_torch():
    """``render_patches`` runs in light Ray workers: it decodes with ``pipeline.images`` (no torch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    code = ("import sys, eval.codebook.scan, pipeline.images, pipeline.token_cache, pipeline.views; "
            "print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo, check=True)
    assert out.stdout.strip() == "False"
    import eval.codebook.scan as scan

    assert not hasattr(scan, "_decode_rgb")
