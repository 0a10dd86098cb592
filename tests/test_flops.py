"""Model FLOPs and MFU (pretrain.flops) against torch's own FLOP counter; regional torch.compile."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.flops import forward_flops_per_image, mfu, peak_tflops, train_flops_per_image
from pretrain.model import MIMModel, ModelConfig


def _inputs(batch: int, img: int, patch: int, masked: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = img // patch
    images = torch.randn(batch, 3, img, img, generator=g)
    mask = torch.zeros(batch, grid * grid, dtype=torch.bool)
    for i in range(batch):
        mask[i, torch.randperm(grid * grid, generator=g)[:masked]] = True
    tokens = torch.randint(0, vocab, (batch, grid * grid), generator=g)
    return images, mask, tokens


@pytest.mark.parametrize("head,target", [("v1", "tokens"), ("v2", "tokens"), ("v1", "pixels")])
def test_forward_flops_match_torch_flop_counter(head, target):
    cfg = ModelConfig(dim=48, depth=3, heads=4, patch=8, mlp_ratio=3.0, drop_path=0.0, head=head, v2_layer=2)
    img, masked, vocab, batch = 48, 11, 96, 3
    model = MIMModel(cfg, img, target, vocab)
    images, mask, tokens = _inputs(batch, img, cfg.patch, masked, vocab)
    with FlopCounterMode(display=False) as counter:
        model(images, mask, tokens)
    out_dim = 3 * cfg.patch**2 if target == "pixels" else vocab
    assert forward_flops_per_image(cfg, img, out_dim, masked) * batch == counter.get_total_flops()


def test_training_flops_are_three_forwards_up_to_the_patch_embedding_input_grad():
    cfg = ModelConfig(dim=64, depth=2, heads=4, patch=8, drop_path=0.0)
    img, masked, vocab, batch = 32, 6, 64, 4
    model = MIMModel(cfg, img, "tokens", vocab)
    images, mask, tokens = _inputs(batch, img, cfg.patch, masked, vocab)
    with FlopCounterMode(display=False) as counter:
        model(images, mask, tokens)["loss"].backward()
    counted = counter.get_total_flops()
    estimate = train_flops_per_image(cfg, img, vocab, masked) * batch
    # the images need no gradient, so backward skips one convolution: counted = estimate - embed forward
    embed = batch * 2 * (img // cfg.patch) ** 2 * 3 * cfg.patch**2 * cfg.dim
    assert counted == estimate - embed


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("NVIDIA L40") == 181.0
    assert peak_tflops(None) is None and peak_tflops("Some Future GPU") is None
    # ViT-B/16 at 224 is 17.6 GMACs (timm's figure), 35.1 GFLOPs; the head on 75 of 196 patches adds
    # 2 * 75 * 768 * 8192 = 0.94 GFLOPs
    base = ModelConfig()
    encoder = forward_flops_per_image(base, 224, 8192, 0)
    assert 35.0e9 < encoder < 35.3e9
    assert forward_flops_per_image(base, 224, 8192, 75) - encoder == 2 * 75 * 768 * 8192
    # 1000 images/s at 3 x 36.1 GFLOPs on a 989 TFLOP/s GPU: 10.9% MFU
    assert mfu(1000.0, train_flops_per_image(base, 224, 8192, 75), 989.0) == pytest.approx(0.1094, abs=5e-4)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=2, patch=8, drop_path=0.0, head="v2", v2_layer=1, v2_blocks=1)
    eager = MIMModel(cfg, 32, "tokens", 64)
    compiled = MIMModel(cfg, 32, "tokens", 64)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    images, mask, tokens = _inputs(4, 32, 8, 6, 64)
    a, b = eager(images, mask, tokens), compiled(images, mask, tokens)
    a["loss"].backward()
    b["loss"].backward()
    assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=1e-5)
    ga = torch.cat([p.grad.flatten() for p in eager.parameters()])
    gb = torch.cat([p.grad.flatten() for p in compiled.parameters()])
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
