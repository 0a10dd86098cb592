"""Evaluation: kNN, linear probe, layer-wise lr decay, label subsets, splits, feature cache, run_eval."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch


def write_encoder(directory, *, dim=32, depth=2, heads=2, patch=8, img_size=32, seed=1234):
    """A tiny encoder in the export format (config.json + model.safetensors), as pretrain/export writes it."""
    import timm.models.beit as beit
    from safetensors.torch import save_file

    from pretrain.model import ModelConfig, encoder_kwargs

    directory.mkdir(parents=True, exist_ok=True)
    kwargs = encoder_kwargs(ModelConfig(dim=dim, depth=depth, heads=heads, patch=patch), img_size)
    torch.manual_seed(seed)
    model = beit.Beit(**kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    cfg = {
        "architecture": "beit", "timm_kwargs": kwargs, "img_size": img_size, "patch_size": patch,
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "source_checkpoint": "test",
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return write_encoder(tmp_path_factory.mktemp("enc") / "encoder")


def write_png_folder(root, layout: dict[str, int], size=16, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub, n in layout.items():
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"img{i:03d}.png")
    return root


# --------------------------------------------------------------------------------------------- kNN


def test_knn_well_separated_clusters_is_perfect():
    from eval.knn import knn_eval

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)) * 10
    def draw(n):
        y = np.repeat(np.arange(6), n)
        return centres[y] + rng.normal(scale=0.1, size=(len(y), 16)), y
    (xa, ya), (xb, yb) = draw(30), draw(10)
    r = knn_eval(xa, ya, xb, yb, k=20, temperature=0.07)
    assert r["top1"] == 1.0 and r["top5"] == 1.0
    assert r["k"] == 20 and r["n_train"] == 180 and r["n_test"] == 60


def test_knn_votes_are_temperature_weighted():
    from eval.knn import knn_votes

    # one near neighbour of class 0, two farther ones of class 1 (cosine 0.99 vs 0.8)
    q = np.array([[1.0, 0.0]])
    near = [1.0, np.sqrt(1 / 0.99**2 - 1)]
    far = [1.0, np.sqrt(1 / 0.8**2 - 1)]
    train = np.array([near, far, far])
    labels = np.array([0, 1, 1])
    sharp = knn_votes(train, labels, q, num_classes=2, k=3, temperature=0.07)
    flat = knn_votes(train, labels, q, num_classes=2, k=3, temperature=100.0)
    assert sharp.argmax() == 0  # exp(0.99/0.07) > 2 * exp(0.8/0.07)
    assert flat.argmax() == 1  # nearly uniform weights: the majority wins
    assert sharp[0, 0] / sharp[0, 1] == pytest.approx(np.exp((0.99 - 0.8) / 0.07) / 2, rel=1e-3)


# ------------------------------------------------------------------------------------ linear probe


def test_linear_probe_learns_a_separable_toy_set():
    from eval.linear_probe import linear_probe

    rng = np.random.default_rng(1)
    w = rng.normal(size=(20, 4))
    z = rng.normal(size=(1500, 20))
    scores = z @ w
    top = np.sort(scores, axis=1)
    keep = top[:, -1] - top[:, -2] > 0.5  # a margin: linearly separable
    x = z[keep] * rng.uniform(0.1, 10, size=20) + 3.0  # badly scaled, off-centre: normalisation matters
    y = scores[keep].argmax(1)
    r = linear_probe(x[:800], y[:800], x[800:], y[800:], num_classes=4, weight_decays=[1e-5, 1e-4])
    assert r["top1"] >= 0.99
    assert r["train_top1"] >= 0.99
    assert set(r["val_top1"]) == {"1e-05", "0.0001"}


def test_linear_probe_adamw_also_learns():
    from eval.linear_probe import linear_probe

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 600)
    x = rng.normal(size=(600, 8)) + 4 * np.eye(3, 8)[y]
    r = linear_probe(x[:400], y[:400], x[400:], y[400:], optimizer="adamw", epochs=60, weight_decays=[1e-4])
    assert r["top1"] >= 0.95


# ----------------------------------------------------------------------------------- fine-tune bits


def test_layer_wise_decay_gives_expected_lrs():
    import timm.models.beit as beit

    from pipeline.train_worker import layer_id, param_groups

    depth, decay, lr = 4, 0.65, 2e-3
    model = beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=5,
                      use_abs_pos_emb=True, use_shared_rel_pos_bias=True, init_values=0.1)
    groups = param_groups(model, 0.05, layer_decay=decay, base_lr=lr)
    lrs = {n: g["lr"] for g in groups for n in g["param_names"]}
    wds = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert set(lrs) == {n for n, _ in model.named_parameters()}
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "rel_pos_bias.relative_position_bias_table"):
        assert lrs[name] == pytest.approx(lr * decay ** (depth + 1)), name
    for i in range(depth):
        assert lrs[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(lr * decay ** (depth - i))
        assert lrs[f"blocks.{i}.mlp.fc2.bias"] == pytest.approx(lr * decay ** (depth - i))
    assert lrs["head.weight"] == pytest.approx(lr)
    assert lrs["fc_norm.weight"] == pytest.approx(lr)
    assert layer_id("blocks.3.norm1.weight", depth) == 4 and layer_id("head.bias", depth) == depth + 1
    # no weight decay on biases, norms, [CLS], position tables; decay on matrices
    assert wds["blocks.0.attn.qkv.weight"] == 0.05 and wds["head.weight"] == 0.05
    for name in ("blocks.0.mlp.fc1.bias", "blocks.1.norm2.weight", "cls_token", "pos_embed", "blocks.0.gamma_1"):
        assert wds[name] == 0.0, name


def test_lr_schedule_warmup_then_cosine():
    from pipeline.train_worker import warmup_cosine

    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_label_fraction_is_class_balanced_and_deterministic():
    from eval.finetune_data import class_balanced_subset

    labels = np.repeat(np.arange(4), [100, 50, 20, 3])
    keys = [f"k{i}" for i in range(len(labels))]
    sub = class_balanced_subset(labels, keys, 0.1, seed=0)
    assert np.bincount(labels[sub]).tolist() == [10, 5, 2, 1]  # round(0.1 n), at least one per class
    assert np.array_equal(sub, class_balanced_subset(labels, keys, 0.1, seed=0))
    assert not np.array_equal(sub, class_balanced_subset(labels, keys, 0.1, seed=1))
    # independent of order: the same keys are chosen when the listing is shuffled
    perm = np.random.default_rng(0).permutation(len(labels))
    sub2 = class_balanced_subset(labels[perm], [keys[i] for i in perm], 0.1, seed=0)
    assert sorted(keys[i] for i in sub) == sorted(keys[perm[i]] for i in sub2)
    assert len(class_balanced_subset(labels, keys, 1.0)) == len(labels)
    with pytest.raises(ValueError):
        class_balanced_subset(labels, keys, 0.0)


# --------------------------------------------------------------------------------- data and splits


def test_unlabelled_source_is_refused(tmp_path, tiny_encoder):
    from eval.evaluate import EvalConfig, run_eval
    from eval.features import EvalError
    from mimflow.cli import main

    flat = write_png_folder(tmp_path / "flat", {".": 3})
    cfg = EvalConfig(encoder=str(tiny_encoder), train_source=str(flat), out=str(tmp_path / "out"))
    with pytest.raises(EvalError, match="has no labels"):
        run_eval(cfg, verbose=False)
    assert not (tmp_path / "out" / "eval.json").exists()
    code = main(["eval", "--encoder", str(tiny_encoder), "--train", str(flat), "--out", str(tmp_path / "o2")])
    assert code == 2


def test_splits_from_the_source_or_by_hash(tmp_path):
    from eval.splits import SplitPlan, resolve_split

    plan = resolve_split("shapes?n=20&size=32", None)
    assert (plan.mode, plan.train, plan.test) == ("source", "shapes?n=20&size=32&split=train", "shapes?n=20&size=32&split=test")
    folder = write_png_folder(tmp_path / "tv", {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1})
    plan = resolve_split(str(folder), None)
    assert plan.mode == "source" and plan.test.endswith("?split=val")
    classes = write_png_folder(tmp_path / "cls", {"a": 30, "b": 30})
    plan = resolve_split(str(classes), None, 0.25)
    assert plan.mode == "hash" and plan.train == plan.test
    keys = [f"a_img{i:03d}" for i in range(400)]
    train_mask, test_mask = plan.masks(keys)
    assert not (train_mask & test_mask).any() and (train_mask | test_mask).all()
    assert 0.18 < test_mask.mean() < 0.32
    assert np.array_equal(test_mask, SplitPlan(str(classes), str(classes), "hash", 0.25).masks(keys)[1])
    plan = resolve_split("shapes?n=20", "shapes?n=10&split=test")
    assert plan.mode == "given"


# ------------------------------------------------------------------------------- features and cache


def test_features_cached_and_reused(tmp_path, tiny_encoder, monkeypatch):
    import eval.feature_job as J
    import eval.features as F
    import eval.feature_worker as W

    enc = F.load_encoder(tiny_encoder)
    spec = "shapes?n=12&size=32&seed=3&partition_size=5"
    cache = str(tmp_path / "cache")
    first = J.extract_features([enc], spec, pooling="cls", cache_dir=cache, workers=0)["pretrained"]
    assert not first.cached and first.features.shape == (12, 32) and first.features.dtype == np.float32
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert {p.name for p in files} == {"features.npy", "index.parquet", "meta.json"}  # the parts are gone

    def boom(*a, **k):
        raise AssertionError("features recomputed despite a cache entry")

    monkeypatch.setattr(W, "compute_features", boom)
    monkeypatch.setattr(W, "decode_partition", boom)
    again = J.extract_features([F.load_encoder(tiny_encoder)], spec, pooling="cls", cache_dir=cache, workers=0)
    again = again["pretrained"]
    assert again.cached
    np.testing.assert_array_equal(again.features, first.features)
    assert again.keys == first.keys and np.array_equal(again.labels, first.labels)
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rewritten
    # another pooling, layer or encoder is another entry
    monkeypatch.undo()
    other = J.extract_features([enc], spec, pooling="mean", layer=0, cache_dir=cache, workers=0)["pretrained"]
    assert not other.cached
    rand = F.random_encoder(enc, seed=0)
    assert rand.encoder_id != enc.encoder_id
    assert F.random_encoder(enc, seed=0).encoder_id == rand.encoder_id  # a seeded baseline is reproducible


def test_feature_poolings_and_layers(tiny_encoder):
    import eval.features as F

    enc = F.load_encoder(tiny_encoder)
    x = np.random.default_rng(0).integers(0, 255, (3, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        tokens = enc.model.forward_features(F.normalise(x, enc.mean, enc.std))
    np.testing.assert_allclose(F.compute_features(enc, x, pooling="cls"), tokens[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(F.compute_features(enc, x, pooling="mean"), tokens[:, 1:].mean(1).numpy(), atol=1e-5)
    last_block = F.compute_features(enc, x, pooling="cls", layer=-1)
    assert not np.allclose(last_block, tokens[:, 0].numpy())  # a block's output, before the final norm
    with pytest.raises(F.EvalError, match="out of range"):
        F.compute_features(enc, x, layer=2)


# ------------------------------------------------------------------------------------------ run_eval


@pytest.mark.slow
def test_run_eval_writes_results_and_table(tmp_path, tiny_encoder, ray_local):
    from eval.eval_config import EvalConfig, ProbeConfig
    from eval.evaluate import format_table, run_eval

    cfg = EvalConfig(
        encoder=str(tiny_encoder), train_source="shapes?n=60&size=32", methods=["knn", "linear"],
        baseline="random", out=str(tmp_path / "out"), probe=ProbeConfig(epochs=50),
    )
    doc = run_eval(cfg, verbose=False)
    on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))
    assert doc["data"]["split"] == "source" and doc["data"]["n_train"] == 60 and doc["data"]["num_classes"] == 10
    for name in ("pretrained", "random"):
        for method, metrics in (("knn", ("top1", "top5")), ("linear", ("top1",))):
            for m in metrics:
                assert 0.0 <= doc["results"][name][method][m] <= 1.0
    d = doc["results"]["pretrained"]["knn"]["top1"] - doc["results"]["random"]["knn"]["top1"]
    assert doc["delta"]["knn"]["top1"] == pytest.approx(d)
    table = format_table(doc)
    assert "kNN (k=20, T=0.07)" in table and "linear probe" in table and "Δ" in table
    assert (tmp_path / "out" / "config.yaml").is_file()
    # the inputs fingerprint names exactly what the result depends on
    from dataclasses import replace

    from eval.evaluate import inputs_fingerprint
    from eval.features import load_encoder

    enc_id = load_encoder(cfg.encoder).encoder_id
    assert inputs_fingerprint(cfg, enc_id) == doc["inputs"]
    assert inputs_fingerprint(replace(cfg, k=5), enc_id) != doc["inputs"]
    assert inputs_fingerprint(replace(cfg, train_source="shapes?n=61&size=32"), enc_id) != doc["inputs"]
    # second run: every feature comes from the cache
    assert not doc["features"]["entries"]["pretrained"]["train"]["cached"]
    again = run_eval(cfg, verbose=False)
    for name in ("pretrained", "random"):
        assert all(e["cached"] for e in again["features"]["entries"][name].values())
        assert again["results"][name]["knn"]["top1"] == doc["results"][name]["knn"]["top1"]
        assert again["results"][name]["linear"]["top1"] == doc["results"][name]["linear"]["top1"]


def test_cli_quick_flags_and_recipe(tmp_path):
    from eval.eval_cli import config_from_args
    from mimflow.cli import build_parser
    from pipeline.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(["eval", "--config", "demo", "--set", "k=5", "--encoder", "E", "--methods", "knn,finetune",
                              "--baseline", "none", "--out", str(tmp_path)])
    cfg = config_from_args(args)
    assert (cfg.encoder, cfg.k, cfg.methods, cfg.baseline) == (os.path.abspath("E"), 5, ["knn", "finetune"], "none")  # paths resolved in the driver
    assert cfg.train_source.startswith("shapes?") and cfg.test_source.endswith("split=test")
    args = parser.parse_args(["eval", "--encoder", "E", "--train", "shapes?n=5"])
    cfg = config_from_args(args)  # no --config with quick flags: the defaults
    assert cfg.train_source == "shapes?n=5" and cfg.methods == ["knn", "linear"]
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_args(parser.parse_args(["eval", "--encoder", "E", "--methods", "knn,svm"]))
    with pytest.raises(ConfigError, match="label_fraction"):
        config_from_args(parser.parse_args(["eval", "--encoder", "E", "--set", "finetune.label_fraction=0"]))
