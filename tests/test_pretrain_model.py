from __future__ import annotations

import math

import pytest
import torch

from pretrain.model import MIMModel, ModelConfig, encoder_kwargs
from pretrain.optim import OptimConfig, WarmupCosine, make_optimizer, make_scheduler

TINY = dict(dim=32, depth=2, heads=2, patch=8, drop_path=0.0)


def _batch(b=4, size=32, grid=4, vocab=64, masked=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    mask = torch.zeros(b, grid * grid, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(grid * grid, generator=g)[:masked]] = True
    tokens = torch.randint(0, vocab, (b, grid, grid), generator=g)
    return images, mask, tokens


@pytest.mark.parametrize("head", ["v1", "v2"])
def test_targets_of_unmasked_positions_do_not_change_the_loss(head):
    torch.manual_seed(0)
    model = MIMModel(ModelConfig(**TINY, head=head, v2_layer=1), 32, "tokens", 64).eval()
    images, mask, tokens = _batch()
    changed = tokens.clone().reshape(4, -1)
    changed[~mask] = (changed[~mask] + 17) % 64
    changed = changed.reshape(tokens.shape)
    assert not torch.equal(changed, tokens)
    a = model(images, mask, tokens)
    b = model(images, mask, changed)
    assert a["loss"].item() == b["loss"].item()
    assert int(a["count"]) == int(mask.sum())
    # ... while changing a masked position's target does change it
    masked_changed = tokens.clone().reshape(4, -1)
    masked_changed[mask] = (masked_changed[mask] + 17) % 64
    assert model(images, mask, masked_changed.reshape(tokens.shape))["loss"].item() != a["loss"].item()


def test_pixel_target_ignores_unmasked_pixels():
    torch.manual_seed(0)
    model = MIMModel(ModelConfig(**TINY), 32, "pixels").eval()
    images, mask, _ = _batch()
    base = model.pixel_targets(images)
    # the loss sees unmasked pixels only through the encoder input; its *target* part is masked only
    out = model.predict(images, mask)["mim"]
    assert out.shape == (int(mask.sum()), 3 * 8 * 8)
    t = base.clone()
    t[~mask] = 123.0  # garbage at unmasked positions: the masked-target MSE is unchanged
    mse = torch.nn.functional.mse_loss(out, base[mask]).item()
    assert torch.nn.functional.mse_loss(out, t[mask]).item() == mse
    assert abs(model(images, mask)["loss"].item() - mse) < 1e-6
    per_patch = base.reshape(-1, 3 * 64)
    assert torch.allclose(per_patch.mean(-1), torch.zeros(per_patch.shape[0]), atol=1e-5)


def test_mask_token_replaces_masked_patch_embeddings_only():
    torch.manual_seed(0)
    model = MIMModel(ModelConfig(**TINY), 32, "tokens", 64).eval()
    images, mask, _ = _batch()
    with torch.no_grad():
        plain = model.forward_features(images)["tokens"]
        assert torch.allclose(plain, model.encoder.forward_features(images), atol=0, rtol=0)
        masked = model.forward_features(images, mask)["tokens"]
        # the masked images' features change ...
        assert not torch.allclose(masked, plain)
        # ... and do not depend on the pixels under the mask
        noisy = images.clone()
        px = mask.reshape(4, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
        noisy = torch.where(px[:, None], torch.randn_like(noisy), noisy)
        assert torch.allclose(model.forward_features(noisy, mask)["tokens"], masked, atol=1e-5)


@pytest.mark.parametrize("head,target", [("v1", "tokens"), ("v2", "tokens"), ("v1", "pixels")])
def test_tiny_model_overfits_one_batch(head, target):
    torch.manual_seed(0)
    model = MIMModel(ModelConfig(dim=48, depth=2, heads=3, patch=8, drop_path=0.0, head=head, v2_layer=1),
                     32, target, 64)
    images, mask, tokens = _batch(b=8, masked=6, seed=1)
    cfg = OptimConfig(lr=5e-3, min_lr=5e-4, weight_decay=0.0, warmup_steps=5, clip=3.0)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total_steps=150, warmup_steps=5)
    first = None
    for _ in range(150):
        out = model(images, mask, tokens)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        first = first if first is not None else out["loss"].item()
    model.eval()
    with torch.no_grad():
        last = model(images, mask, tokens)
    if target == "tokens":  # 48 masked tokens of random ids, memorised: ~4.2 (ln 64) -> < 0.1
        assert last["loss"].item() < first / 10, (first, last["loss"].item())
        assert last["correct"].item() / last["count"].item() > 0.95
    else:  # white-noise patches, per-patch normalised: MSE 1.0 -> ~0.45
        assert last["loss"].item() < first / 1.8, (first, last["loss"].item())


def test_no_weight_decay_on_norms_biases_tokens_and_position_tables():
    model = MIMModel(ModelConfig(**{**TINY, "head": "v2"}, v2_layer=1), 32, "tokens", 64)
    skip = model.no_weight_decay()
    assert {"mask_token", "encoder.cls_token"} <= skip
    assert any("relative_position_bias_table" in n for n in skip)
    assert all(n in skip for n, p in model.named_parameters() if p.ndim == 1)
    assert "encoder.blocks.0.attn.qkv.weight" not in skip and "head.weight" not in skip
    groups = make_optimizer(model, OptimConfig(weight_decay=0.05)).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i] not in skip for i in decayed)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine():
    f = WarmupCosine(total_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)
    vals = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert math.isclose(f(35), 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_encoder_kwargs_build_timm_beit():
    from timm.models.beit import Beit

    kw = encoder_kwargs(ModelConfig(**TINY), 32)
    enc = Beit(**kw)
    assert kw["use_abs_pos_emb"] is False and kw["use_shared_rel_pos_bias"] is True and kw["num_classes"] == 0
    assert enc.pos_embed is None and enc.rel_pos_bias is not None
    with pytest.raises(ValueError):
        encoder_kwargs(ModelConfig(**TINY), 30)
