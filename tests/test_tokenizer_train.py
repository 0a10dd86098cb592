"""Tokenizer training as a real Ray Train job: loss goes down, DDP codebooks agree, reruns resume or skip."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config import load_config
from tokenizer.checkpoint import load_tokenizer, tokenizer_id
from tokenizer.train import train_tokenizer
from tokenizer.train_config import TokenizerTrainConfig

TINY_VQKD = [
    "source=shapes?n=96&size=32&seed=3",
    "model.vocab_size=32",
    "model.grid=4",
    "model.input_size=32",
    "model.width=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.code_dim=8",
    "model.mlp_ratio=2.0",
    "hog_cell=4",
    "epochs=12",
    "batch_size=16",
    "lr=3e-3",
    "warmup_epochs=0.5",
    "restart_every=4",
    "heldout_size=32",
    "cpus_per_worker=1",
]

TINY_DVAE = [
    "source=shapes?n=96&size=32&seed=3",
    "model.vocab_size=32",
    "model.grid=8",
    "model.input_size=32",
    "model.width=8",
    "model.code_dim=8",
    "epochs=12",
    "batch_size=16",
    "lr=5e-3",
    "warmup_epochs=0.5",
    "heldout_size=16",
    "cpus_per_worker=1",
]


def _meta(out):
    return json.loads((out / "train.json").read_text())


@pytest.mark.slow
def test_vqkd_ddp_two_workers(ray_local, tmp_path, capsys):
    out = tmp_path / "vqkd"
    cfg = load_config(
        TokenizerTrainConfig, "vqkd_demo",
        [*TINY_VQKD, "num_workers=2", f"out={out}", f"storage_path={tmp_path / 'ray'}", "run_name=vqkd-ddp"],
    )
    assert train_tokenizer(cfg) == out
    meta = _meta(out)
    history = meta["history"]
    assert [h["epoch"] for h in history] == list(range(1, 13))
    # a short run lowers the cosine distance to the (standardised) teacher features by a clear amount
    first = history[0]["first_step_loss"]
    assert 0.9 < first < 1.1  # untrained: about orthogonal to the targets
    assert history[-1]["rec"] < 0.8 * first, (first, [h["rec"] for h in history])
    # both ranks hold the same codebook (EMA statistics are all-reduced)
    check = meta["codebook_check"]
    assert check["ranks"] == 2 and check["identical"] and check["max_abs_diff"] == 0.0
    assert len(set(check["sha256"])) == 1
    # the recipe's codebook warm-up (half of the 12 epochs): no codes are chosen before the codebook exists
    assert cfg.codebook_warmup == 0.5
    assert [h["codes_used"] for h in history[:6]] == [0] * 6
    assert all(h["codes_used"] > 0 for h in history[6:])
    # per-epoch usage is over the whole epoch: most of the small codebook is used
    assert history[-1]["codes_used"] >= 24 and history[-1]["perplexity"] > 10
    held = meta["heldout"]
    assert held["images"] == 32 and held["tokens"] == 32 * 16 and held["vocab_size"] == 32
    assert "shapes 'test' split" in held["description"]
    tok = load_tokenizer(out)
    assert tok.tokenizer_id == meta["tokenizer_id"] == tokenizer_id(out)
    printed = capsys.readouterr().out
    assert f"held-out codebook usage: {held['codes_used']}/32 codes" in printed
    assert "codebooks identical on all 2 ranks" in printed
    assert (out / "config.yaml").is_file() and not (out / "reconstructions.png").exists()

    # Same config and source again: the output is current, nothing retrains.
    assert train_tokenizer(cfg) == out
    assert "is current" in capsys.readouterr().out
    assert _meta(out)["finished"] == meta["finished"]

    # Output lost but the run's checkpoints kept: the rerun resumes from the last one (no epochs left)
    # and yields the very same tokenizer.
    shutil.rmtree(out)
    train_tokenizer(cfg)
    again = _meta(out)
    assert again["resumed_from_epoch"] == 12 and again["tokenizer_id"] == meta["tokenizer_id"]
    assert again["history"] == history


@pytest.mark.slow
def test_dvae_via_cli_lowers_loss_and_saves_reconstructions(ray_local, tmp_path, capsys):
    from mimflow.cli import main

    out = tmp_path / "dvae"
    args = ["tokenizer", "train", "--config", "dvae_demo"]
    for item in [*TINY_DVAE, f"out={out}", f"storage_path={tmp_path / 'ray'}"]:
        args += ["--set", item]
    assert main(args) == 0
    meta = _meta(out)
    losses = [h["loss"] for h in meta["history"]]
    first = meta["history"][0]["first_step_loss"]  # the untrained model's loss
    assert losses[-1] < 0.75 * first and losses[-1] < losses[0], (first, losses)
    assert meta["history"][-1]["temperature"] < meta["history"][0]["temperature"]
    from PIL import Image

    with Image.open(out / "reconstructions.png") as png:  # 8 held-out inputs beside their decodes
        assert png.size == (64, 8 * 34)
    tok = load_tokenizer(out)
    assert tok.kind == "dvae" and tok.grid == (8, 8) and tok.input_size == 32
    assert "held-out codebook usage" in capsys.readouterr().out


def test_cli_errors_name_the_field(tmp_path, capsys):
    from mimflow.cli import main

    assert main(["tokenizer", "train", "--config", "vqkd_demo", "--set", "model.vocab_size=1"]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--config", "vqkd_demo", "--set", "epoch=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--config", "nope"]) == 2
    assert "no tokenizer recipe named 'nope'" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--set", "teacher=timm:vit_tiny_patch16_224", "--set", f"out={tmp_path}/t"]) == 2
    assert "teacher_weights" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--config", "demo", "--print-config"]) == 0
    assert "kind: vqkd" in capsys.readouterr().out


def test_bad_inputs_are_counted_and_skipped(ray_local, tmp_path):
    import numpy as np

    from pipeline.images import encode_png

    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        (src / f"img{i:03d}.png").write_bytes(encode_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "tok"
    cfg = load_config(
        TokenizerTrainConfig, "vqkd_demo",
        [*TINY_VQKD, f"source={src}", "epochs=1", "num_workers=0", "heldout_size=8", f"out={out}",
         f"storage_path={tmp_path / 'ray'}"],
    )
    train_tokenizer(cfg)
    meta = _meta(out)
    # 42 items in name order: broken.png, img000..img039, notes.txt; the last 8 are held out
    assert meta["history"][0]["bad_inputs"] == 1
    assert len(meta["bad_examples"]) == 1 and "broken.png" in meta["bad_examples"][0]
    assert "not a recognised image format" in meta["bad_examples"][0] or "cannot decode" in meta["bad_examples"][0]
    held = meta["heldout"]
    assert held["images"] == 7 and held["bad_inputs"] == 1 and "not trained on" in held["description"]
    assert load_tokenizer(out).encode(__import__("torch").rand(1, 3, 32, 32)).shape == (1, 4, 4)


@pytest.mark.parametrize("spec", ["shapes?n=10&size=32&split=test"])
def test_heldout_plan(spec):
    from pipeline.sources import open_source
    from tokenizer.train_config import make_plan

    cfg = TokenizerTrainConfig(source=spec, heldout_size=4)
    plan = make_plan(cfg, open_source(spec))
    assert "split=heldout" in plan.heldout_spec and (plan.train_start, plan.train_stop) == (0, 10)
