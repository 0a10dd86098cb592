"""The VQ-KD codebook: EMA update, k-means init, dead-code restart, usage statistics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenizer.quantizer import NormEMAQuantizer, kmeans_codes, usage_stats


def _unit(*xs):
    v = torch.tensor(xs, dtype=torch.float32)
    return v / v.norm()


def test_ema_update_hand_computed():
    q = NormEMAQuantizer(3, 2, decay=0.5).train()
    q.embedding.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    q.initted.fill_(True)
    z = torch.stack([_unit(0.8, 0.6), _unit(1.0, 0.0), _unit(0.6, 0.8)])
    z_q, idx, commitment = q(z)
    # assignment uses the codebook before the update: (0.8,0.6)->0, (1,0)->0, (0.6,0.8)->1, code 2 unused
    assert idx.tolist() == [0, 0, 1]
    assert torch.allclose(z_q, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))  # straight-through value
    expected_commit = ((0.8 - 1) ** 2 + 0.6**2 + 0 + 0.6**2 + (0.8 - 1) ** 2) / 6
    assert math.isclose(float(commitment), expected_commit, rel_tol=1e-5)
    # code 0: mean of (0.8,0.6),(1,0) = (0.9,0.3) -> normalised (0.94868,0.31623);
    #         0.5*(1,0) + 0.5*(0.94868,0.31623) = (0.97434,0.15811) -> normalised (0.98710,0.16018)
    # code 1: 0.5*(0,1) + 0.5*(0.6,0.8) = (0.3,0.9) -> normalised (0.31623,0.94868)
    # code 2: unused -> unchanged
    expected = torch.tensor([[0.98710, 0.16018], [0.31623, 0.94868], [-1.0, 0.0]])
    assert torch.allclose(q.embedding, expected, atol=1e-4)
    assert torch.allclose(q.cluster_size, torch.tensor([1.0, 0.5, 0.0]))  # 0.5*0 + 0.5*counts
    assert torch.allclose(q.embedding.norm(dim=-1), torch.ones(3))


def test_eval_mode_never_updates():
    q = NormEMAQuantizer(4, 3).eval()
    before = q.embedding.clone()
    q(F.normalize(torch.randn(10, 3), dim=-1))
    assert torch.equal(q.embedding, before) and not bool(q.initted)


def test_gradients_pass_straight_through():
    q = NormEMAQuantizer(4, 3).train()
    q.initted.fill_(True)
    z = F.normalize(torch.randn(5, 3), dim=-1).requires_grad_()
    z_q, _, _ = q(z)
    (z_q * torch.arange(3.0)).sum().backward()
    assert torch.allclose(z.grad, torch.arange(3.0).expand(5, 3))


def _clusters(k: int, d: int, per: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    points = centres.repeat_interleave(per, 0) + noise * torch.randn(k * per, d, generator=g)
    return centres, F.normalize(points, dim=-1)


def test_kmeans_init_places_codes_on_the_data():
    centres, points = _clusters(4, 16, 100, 0.05)
    q = NormEMAQuantizer(8, 16, kmeans_points_per_code=4).train()
    before = q.embedding.clone()
    assert not bool(q.initted)
    q(points)  # 400 points >= 8 codes * 4: k-means runs on this first batch
    assert bool(q.initted)
    sim = centres @ q.embedding.t()  # [centres, codes]
    assert float((centres @ before.t()).max(dim=0).values.min()) < 0.9  # random codes were off the data
    assert float(sim.max(dim=1).values.min()) > 0.99  # every cluster has a code on it
    assert float(sim.max(dim=0).values.min()) > 0.99  # every code sits on a cluster
    assert len(q.assign(points).unique()) >= 6  # and the data uses (nearly) all codes


def test_kmeans_init_waits_for_enough_points():
    _, points = _clusters(4, 8, 10, 0.05)
    q = NormEMAQuantizer(16, 8, kmeans_points_per_code=4, kmeans_max_batches=3).train()
    q(points[:20])
    q(points[20:])
    assert not bool(q.initted)  # 40 < 64 points and only 2 of 3 batches
    q(points[:20])
    assert bool(q.initted)  # the third batch forces it (codes from data points when n < k)
    assert float((q.embedding @ points.t()).max(dim=1).values.min()) > 0.95


def test_kmeans_codes_unit_norm():
    x = torch.randn(500, 4).numpy()
    c = kmeans_codes(x, 10, iters=5, seed=0)
    assert c.shape == (10, 4)
    assert abs(float((c**2).sum(1).min()) - 1) < 1e-5


def test_dead_code_restart_revives_unused_codes():
    centres, points = _clusters(2, 8, 64, 0.2, seed=1)
    q = NormEMAQuantizer(6, 8, restart_every=2, decay=0.9).train()
    far = -F.normalize(centres.sum(0), dim=-1)  # points away from the data: nothing picks them
    q.embedding.copy_(torch.cat([centres, far.expand(4, 8) + 0.01 * torch.randn(4, 8)]))
    q.embedding.copy_(F.normalize(q.embedding, dim=-1))
    q.initted.fill_(True)
    assert set(q.assign(points).tolist()) == {0, 1}
    q(points)
    assert q.restarted_total == 0
    q(points)  # step 2: codes 2..5 unused since the last check -> restarted on recent outputs
    assert q.restarted_total == 4
    revived = q.embedding[2:]
    # each revived code is one of the recent encoder outputs ...
    assert float((revived @ points.t()).max(dim=1).values.min()) > 0.999
    # ... so inputs now use it
    used = set(q.assign(points).tolist())
    assert {2, 3, 4, 5} <= used
    assert torch.allclose(q.embedding.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_usage_stats():
    s = usage_stats(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert s["codes_used"] == 2 and s["usage"] == 0.5 and math.isclose(s["perplexity"], 2.0, rel_tol=1e-9)
    s = usage_stats(torch.ones(8))
    assert math.isclose(s["perplexity"], 8.0, rel_tol=1e-9) and s["usage"] == 1.0
