"""Fine-tuning on Ray Train: a tiny encoder, an easy task, real workers."""

from __future__ import annotations

import numpy as np
import pytest

from test_eval import write_encoder


def easy_images(n: int, size: int = 32, seed: int = 0):
    """Two classes a ViT learns in a few steps: dark images and bright images (with noise)."""
    from eval.features import LabelledImages

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels[:, None, None, None] == 1, 190, 60)
    pixels = np.clip(base + rng.normal(0, 25, (n, 3, size, size)), 0, 255).astype(np.uint8)
    return LabelledImages("easy", pixels, labels.astype(np.int64), [f"s{seed}-{i}" for i in range(n)], ["dark", "bright"])


@pytest.mark.slow
def test_finetune_on_ray_train_learns_an_easy_task(tmp_path, ray_local):
    from eval.eval_config import FinetuneConfig
    from eval.features import load_encoder
    from eval.finetune import finetune

    enc = load_encoder(write_encoder(tmp_path / "enc"))
    cfg = FinetuneConfig(epochs=2, lr=2e-3, batch_size=16, workers=1, warmup_epochs=0.5, label_fraction=0.5,
                         drop_path=0.1, augment=True)
    r = finetune(enc, easy_images(96), easy_images(40, seed=1), cfg, num_classes=2, seed=0,
                 storage_path=str(tmp_path / "runs"), name="test-ft")
    assert [h["epoch"] for h in r["epochs"]] == [1, 2]
    assert all(0.0 <= h["top1"] <= 1.0 for h in r["epochs"])
    assert r["n_train"] == 48 and r["n_test"] == 40  # label_fraction 0.5, class-balanced
    assert r["epochs"][-1]["train_loss"] < r["epochs"][0]["train_loss"] or r["top1"] > 0.75
    assert r["top1"] > 0.75  # chance is 0.5
    assert r["top1"] == r["epochs"][-1]["top1"] and r["best_top1"] == max(h["top1"] for h in r["epochs"])
    # the final checkpoint holds the history and the fine-tuned classifier, loadable by timm
    import json
    from pathlib import Path

    import timm.models.beit as beit
    from safetensors.torch import load_file

    ckpt = Path(r["checkpoint"])
    assert json.loads((ckpt / "history.json").read_text()) == r["epochs"]
    meta = json.loads((ckpt / "config.json").read_text())
    model = beit.Beit(**meta["timm_kwargs"])
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    assert model.head.out_features == 2 and meta["classes"] == ["dark", "bright"]


def test_run_eval_finetune_with_baseline(tmp_path, ray_local):
    from eval.eval_config import EvalConfig, FinetuneConfig
    from eval.evaluate import format_table, run_eval

    enc = write_encoder(tmp_path / "enc")
    cfg = EvalConfig(
        encoder=str(enc), train_source="shapes?n=40&size=32", test_source="shapes?n=20&size=32&split=test",
        methods=["finetune"], baseline="random", out=str(tmp_path / "out"),
        finetune=FinetuneConfig(epochs=1, batch_size=16, workers=0, label_fraction=0.5, augment=False),
    )
    doc = run_eval(cfg, verbose=False)
    for name in ("pretrained", "random"):
        ft = doc["results"][name]["finetune"]
        assert len(ft["epochs"]) == 1 and 0.0 <= ft["top1"] <= 1.0
        assert 20 <= ft["n_train"] <= 25 and ft["n_test"] == 20  # half of 40, at least one per class
    assert doc["delta"]["finetune"]["top1"] == pytest.approx(
        doc["results"]["pretrained"]["finetune"]["top1"] - doc["results"]["random"]["finetune"]["top1"]
    )
    assert "fine-tune (1 ep, 50% labels)" in format_table(doc)


@pytest.mark.slow
def test_two_ddp_workers_fine_tune_as_one_worker_with_their_global_batch(tmp_path, ray_local):
    """DDP averages the two ranks' gradients: 2 workers x 8 images must take the steps 1 worker x 16 takes."""
    from eval.eval_config import FinetuneConfig
    from eval.features import load_encoder
    from eval.finetune import finetune

    enc = load_encoder(write_encoder(tmp_path / "enc"))
    train, test = easy_images(64), easy_images(30, seed=1)
    runs = {}
    for workers, batch in ((1, 16), (2, 8)):
        cfg = FinetuneConfig(epochs=2, lr=2e-3, batch_size=batch, workers=workers, warmup_epochs=0.5,
                             label_fraction=1.0, drop_path=0.0, augment=False, keep_model=False)
        runs[workers] = finetune(enc, train, test, cfg, num_classes=2, seed=0,
                                 storage_path=str(tmp_path / "runs"), name=f"ddp-{workers}")
    one, two = runs[1], runs[2]
    assert one["workers"] == 1 and two["workers"] == 2
    assert [h["epoch"] for h in two["epochs"]] == [1, 2]
    for a, b in zip(one["epochs"], two["epochs"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"])
        # each rank scores its half of the test set; the sums over ranks give the same accuracy
        assert abs(b["top1"] - a["top1"]) <= 1 / 30 + 1e-9
    assert one["epochs"][0]["train_loss"] != one["epochs"][1]["train_loss"]  # it did train
