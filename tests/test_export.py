from __future__ import annotations

import json

import pytest
import torch

from pretrain.checkpoint import checkpoint_state, save_checkpoint
from pretrain.model import MIMModel, ModelConfig
from pretrain.optim import OptimConfig, make_optimizer, make_scheduler


def _trained_checkpoint(path, head="v1"):
    """A tiny MIM model after a few optimizer steps (so no weight is at its init), saved as a checkpoint."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=2, patch=8, drop_path=0.1, layer_scale=0.1, head=head, v2_layer=1)
    model = MIMModel(cfg, 32, "tokens", 64)
    opt = make_optimizer(model, OptimConfig(lr=1e-2))
    sched = make_scheduler(opt, OptimConfig(lr=1e-2), 10, 0)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32)
        mask = torch.rand(4, 16) < 0.4
        mask[:, 0] = True
        out = model(x, mask, torch.randint(0, 64, (4, 4, 4)))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
    state = checkpoint_state(model, step=3, total_steps=10, steps_per_epoch=5, img_size=32, mean=[0.5] * 3,
                             std=[0.5] * 3, target="tokens", vocab_size=64, tokenizer_id="tok123", optimizer=opt)
    save_checkpoint(path, model, opt, sched, state, "seed: 0\n")
    return model.eval()


@pytest.mark.parametrize("head", ["v1", "v2"])
def test_export_round_trip_into_timm_beit_with_equal_features(tmp_path, head):
    import safetensors.torch as st
    import timm.models.beit as beit

    from pretrain.export import export_encoder

    model = _trained_checkpoint(tmp_path / "run" / "checkpoint_00000003", head)
    out = export_encoder(tmp_path / "run", str(tmp_path / "encoder"))  # a run dir: its newest checkpoint
    # the two lines a user writes
    cfg = json.load(open(f"{out}/config.json"))
    enc = beit.Beit(**cfg["timm_kwargs"])
    enc.load_state_dict(st.load_file(f"{out}/model.safetensors"), strict=True)
    enc.eval()
    assert cfg["architecture"] == "beit" and cfg["img_size"] == 32 and cfg["patch_size"] == 8
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3 and cfg["tokenizer_id"] == "tok123"
    assert cfg["source_checkpoint"].endswith("checkpoint_00000003")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_features(x)["tokens"]
        theirs = enc.forward_features(x)
        assert torch.equal(ours, theirs)
        assert torch.equal(enc.forward_head(theirs, pre_logits=True), ours[:, 1:].mean(1))
    assert not any(k.startswith(("mask_token", "head", "cls_pt")) for k in st.load_file(f"{out}/model.safetensors"))


def test_load_encoder_accepts_exports_and_checkpoints(tmp_path):
    from pretrain.export import export_encoder, load_encoder

    model = _trained_checkpoint(tmp_path / "ckpt")
    export_encoder(tmp_path / "ckpt", str(tmp_path / "enc"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.forward_features(x)["tokens"]
        for where in (tmp_path / "enc", tmp_path / "ckpt"):
            enc, cfg = load_encoder(where)
            assert not enc.training and cfg["timm_kwargs"]["embed_dim"] == 32
            assert torch.equal(enc.forward_features(x), want)
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "nothing")


def test_mimflow_export_cli(tmp_path, capsys):
    from mimflow.cli import main

    _trained_checkpoint(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "enc")]) == 0
    assert (tmp_path / "enc" / "model.safetensors").is_file() and (tmp_path / "enc" / "config.json").is_file()
    assert "strict=True" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
