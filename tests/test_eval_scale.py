"""Evaluation at scale: features by Ray actors over partitions (same figures as the in-memory path,
resume, progress), kNN through IVF past a memory budget, and a source too big for the driver's memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from test_eval import write_encoder, write_png_folder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return write_encoder(tmp_path_factory.mktemp("enc-scale") / "encoder")


# ------------------------------------------------------------------------------------------- kNN


def _clusters(n_train: int, n_test: int, classes: int, dim: int, spread: float, seed: int):
    """Train and test draws around the same class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))

    def draw(n):
        y = np.repeat(np.arange(classes), n)
        return (centres[y] + rng.normal(scale=spread, size=(len(y), dim))).astype(np.float32), y

    return draw(n_train), draw(n_test)


def test_ivf_with_every_list_probed_matches_flat():
    """IVF-SQ8 with nprobe = nlist searches every (8-bit) vector: the same top-1 as exact flat search
    within 1 point, and the same prediction for >= 98% of queries (the tolerance: quantisation can
    swap near-ties). With few lists probed it is still close on this clustered set."""
    from eval.knn import knn_eval, knn_votes

    (xa, ya), (xb, yb) = _clusters(200, 40, 10, 32, 1.5, 0)
    flat = knn_eval(xa, ya, xb, yb, index="flat")
    full = knn_eval(xa, ya, xb, yb, index="ivf", nlist=16, nprobe=16)
    assert flat["index"] == "flat" and (full["index"], full["nlist"], full["nprobe"]) == ("ivf", 16, 16)
    assert 0.3 < flat["top1"] < 0.999  # neither trivial nor hopeless: ties and near-ties exist
    assert abs(full["top1"] - flat["top1"]) <= 0.01
    agree = (knn_votes(xa, ya, xb, num_classes=10, index="flat").argmax(1)
             == knn_votes(xa, ya, xb, num_classes=10, index="ivf", nlist=16, nprobe=16).argmax(1)).mean()
    assert agree >= 0.98
    few = knn_eval(xa, ya, xb, yb, index="ivf", nlist=16, nprobe=4)
    assert abs(few["top1"] - flat["top1"]) <= 0.05


def test_auto_index_switches_to_ivf_past_the_memory_budget():
    from eval.knn import choose_index, knn_eval

    assert choose_index(1000, 256, "auto", memory_mb=1.0) == "flat"  # 1000 x 256 x 4 B < 1 MiB
    assert choose_index(1025, 256, "auto", memory_mb=1.0) == "ivf"
    assert choose_index(10**9, 256, "flat", memory_mb=1.0) == "flat"  # asked for: honoured
    with pytest.raises(ValueError, match="knn index must be one of"):
        choose_index(10, 2, "hnsw")
    (xa, ya), (xb, yb) = _clusters(100, 10, 4, 8, 0.3, 3)
    r = knn_eval(xa, ya, xb, yb, index="auto", memory_mb=(len(xa) * 8 * 4 - 1) / 2**20)
    assert r["index"] == "ivf" and r["top1"] == 1.0
    assert knn_eval(xa, ya, xb, yb, index="auto", memory_mb=1.0)["index"] == "flat"


# -------------------------------------------------------------------------------------- features


def _in_memory(enc, spec: str, pooling: str = "mean"):
    """What evaluation did before the Ray path: decode every image in this process, encode it all."""
    import eval.features as F

    imgs = F.load_labelled_images(spec, enc.img_size)
    return imgs, F.compute_features(enc, imgs.pixels, pooling=pooling, batch_size=128)


def test_ray_path_gives_the_in_memory_features_and_figures(tmp_path, tiny_encoder, ray_local):
    """Actors over partitions of 16 (two encoders in one pass, bad files on the way) give bit-identical
    features, keys, labels and skipped counts to the in-memory path, so kNN and probe top-1 are equal."""
    import eval.features as F
    from eval.feature_job import extract_features
    from eval.knn import knn_eval
    from eval.linear_probe import linear_probe

    root = write_png_folder(tmp_path / "data", {"a": 30, "b": 30, "c": 20}, size=40)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    spec = f"{root}?partition_size=16"
    enc = F.load_encoder(tiny_encoder)
    rnd = F.random_encoder(enc, 0)
    new = extract_features([enc, rnd], spec, cache_dir=str(tmp_path / "cache"), workers=2)
    assert new["pretrained"].stats["actors"] == 2
    for e in (enc, rnd):
        imgs, old = _in_memory(e, spec)
        fs = new[e.name]
        assert fs.keys == imgs.keys and np.array_equal(fs.labels, imgs.labels)
        assert fs.skipped == len(imgs.skipped) == 1
        np.testing.assert_array_equal(fs.features, old)  # bit-identical
        test = np.array([i % 4 == 0 for i in range(len(fs.keys))])
        for x in (old, fs.features):
            assert knn_eval(x[~test], fs.labels[~test], x[test], fs.labels[test])["top1"] == knn_eval(
                old[~test], imgs.labels[~test], old[test], imgs.labels[test])["top1"]
        probe = [linear_probe(x[~test], fs.labels[~test], x[test], fs.labels[test], epochs=30)["top1"]
                 for x in (old, fs.features)]
        assert probe[0] == probe[1]


def test_two_encoders_with_the_same_weights_share_one_cache_entry(tmp_path, tiny_encoder):
    """The baseline may be the very encoder being evaluated (same id, same entry): computed once, both rows."""
    import dataclasses

    import eval.features as F
    from eval.feature_job import extract_features

    spec = f"{write_png_folder(tmp_path / 'data', {'a': 6, 'b': 6}, size=24)}?partition_size=5"
    enc = F.load_encoder(tiny_encoder)
    twin = dataclasses.replace(enc, name="random")
    for _ in range(2):  # computed, then both from the cache
        out = extract_features([enc, twin], spec, cache_dir=str(tmp_path / "cache"), workers=0)
        assert out["pretrained"].features.shape == (12, enc.model.num_features)
        assert np.array_equal(out["pretrained"].features, out["random"].features)
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 1


def test_rerun_after_a_failure_reuses_finished_partitions(tmp_path, tiny_encoder, monkeypatch, capsys):
    """Partitions finished before a crash are not decoded again; the entry is the same as one run's;
    a progress line (partitions, rate, ETA) every N partitions."""
    import eval.feature_worker as W
    import eval.features as F
    from eval.feature_job import extract_features

    enc = F.load_encoder(tiny_encoder)
    spec = "shapes?n=40&size=32&partition_size=8"  # 5 partitions
    cache = str(tmp_path / "cache")
    real_decode = W.decode_partition
    decoded: list[int] = []

    def crash_on_3(source, part, size):
        if part.index == 3:
            raise RuntimeError("killed")
        decoded.append(part.index)
        return real_decode(source, part, size)

    monkeypatch.setattr(W, "decode_partition", crash_on_3)
    with pytest.raises(RuntimeError, match="killed"):
        extract_features([enc], spec, cache_dir=cache, workers=0)
    parts = sorted((Path(cache)).rglob("part-*.npz"))
    assert [p.name[:11] for p in parts] == ["part-000000", "part-000001", "part-000002"]
    assert not list(Path(cache).rglob("meta.json"))  # no entry: incomplete

    decoded.clear()
    monkeypatch.setattr(W, "decode_partition", lambda s, p, z: (decoded.append(p.index), real_decode(s, p, z))[1])
    capsys.readouterr()
    fs = extract_features([enc], spec, cache_dir=cache, workers=0, progress_every=1)["pretrained"]
    assert decoded == [3, 4]  # 0-2 reused
    assert not any(p.exists() for p in parts)  # removed once the entry was written
    err = capsys.readouterr().err
    assert "3 partitions already done" in err
    lines = [ln for ln in err.splitlines() if re.match(r"eval: features \d+/", ln)]
    assert [ln.split(",")[0] for ln in lines] == ["eval: features 4/5 partitions", "eval: features 5/5 partitions"]
    assert "images/s, ETA" in lines[0] and lines[-1].endswith("ETA 0:00:00")

    monkeypatch.undo()
    once = extract_features([enc], spec, cache_dir=str(tmp_path / "fresh"), workers=0)["pretrained"]
    np.testing.assert_array_equal(fs.features, once.features)
    assert fs.keys == once.keys == [f"train-{i:06d}" for i in range(40)]


# ------------------------------------------------------------------ a source too big for the driver

DRIVER = textwrap.dedent("""
    import json, resource, sys
    import faiss, numpy as np, ray  # libraries mapped before the cap: it measures data, not code
    import eval.knn, eval.linear_probe, timm.models.beit
    from eval.eval_config import EvalConfig, FinetuneConfig, ProbeConfig
    from eval.evaluate import run_eval
    from eval.features import load_labelled_images

    address, encoder, spec, out, headroom_mb = sys.argv[1:6]
    # A driver joining the test session's Ray: its raylet (a child of the pytest process) starts the
    # workers, so only this driver process is capped.
    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    ray.get(ray.put(np.zeros(1 << 20, np.uint8)))  # map the object store now, before the cap
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    cap = vm + int(headroom_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    cfg = EvalConfig(encoder=encoder, train_source=spec, test_fraction=0.25, methods=["knn", "linear", "finetune"],
                     baseline="random", out=out, probe=ProbeConfig(epochs=20, weight_decays=[1e-3]),
                     finetune=FinetuneConfig(epochs=1, batch_size=8, label_fraction=0.1, val_fraction=0.2,
                                             augment=False, keep_model=False, workers=1, evals=1))
    doc = run_eval(cfg, address=address, verbose=True)
    print("RESULT " + json.dumps({"data": doc["data"], "results": doc["results"], "cap": cap}), flush=True)
    try:
        imgs = load_labelled_images(spec, 448)
        print("DIRECT decoded", imgs.pixels.nbytes, flush=True)
    except MemoryError:
        print("DIRECT MemoryError", flush=True)
""")


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_source_bigger_than_the_driver_memory_completes_through_ray(tmp_path, ray_local):
    """A driver capped (RLIMIT_AS) at 512 MiB above its footprint after start-up evaluates 600 images
    of 448 px (decoded centre views: 361 MB, twice that while concatenated) through Ray workers that are
    not capped (the session's Ray, which the capped driver joins): kNN, the probe, and fine-tuning, whose
    Ray Train worker streams the images (the driver lists keys and labels only); decoding the same
    source in that driver fails with MemoryError."""
    from PIL import Image

    enc = write_encoder(tmp_path / "big-encoder", dim=16, depth=1, heads=2, patch=56, img_size=448)
    root = tmp_path / "big"
    for i in range(600):  # flat images: cheap to write and decode, full size once decoded
        d = root / ("dark" if i % 2 else "light")
        d.mkdir(parents=True, exist_ok=True)
        shade = (40 if i % 2 else 200) + i % 17
        Image.fromarray(np.full((448, 448, 3), shade, np.uint8)).save(d / f"im{i:04d}.png", compress_level=1)
    spec = f"{root}?partition_size=50"
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    address = ray_local.get_runtime_context().gcs_address
    r = subprocess.run([sys.executable, "-c", DRIVER, address, str(enc), spec, str(tmp_path / "out"), "512"], env=env,
                       cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=500)
    out = r.stdout[:3000] + "\n...\n" + r.stdout[-3000:]
    assert r.returncode == 0, out
    doc = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert doc["data"]["n_train_available"] + doc["data"]["n_test"] == 600 and doc["data"]["num_classes"] == 2
    for name in ("pretrained", "random"):
        assert doc["results"][name]["knn"]["top1"] == 1.0  # two flat shades: trivially separable
        assert doc["results"][name]["knn"]["index"] == "flat"
        ft = doc["results"][name]["finetune"]
        assert ft["n_test"] == doc["data"]["n_test"] and ft["n_train"] + ft["n_val"] == ft["n_labelled"]
        assert doc["results"][name]["knn"]["n_train"] == ft["n_labelled"] == doc["data"]["n_train"]  # one subset
        assert 40 <= ft["n_labelled"] <= 50 and 0.0 <= ft["top1"] <= 1.0  # 10% of the ~450 train images
    assert "DIRECT MemoryError" in r.stdout, out


def test_stream_gives_every_rank_the_same_batch_count():
    """Uneven partitions over two ranks: each yields ceil(40 / (2 x 5)) = 4 batches of 5; rank 1 (one
    partition, fewer than 20 items) cycles; every image is one of the source's centre views."""
    import eval.features as F
    from eval.stream import LabelledStream

    spec = "shapes?n=40&size=32&partition_size=16"
    whole = F.load_labelled_images(spec, 32)
    known = {whole.pixels[i].tobytes(): int(whole.labels[i]) for i in range(len(whole))}
    per_rank = []
    for rank in (0, 1):
        batches = list(LabelledStream(spec, 32, batch_size=5, rank=rank, world_size=2))
        assert [tuple(b["image"].shape) for b in batches] == [(5, 3, 32, 32)] * 4
        pixels = [p.numpy().tobytes() for b in batches for p in b["image"]]
        labels = [int(y) for b in batches for y in b["label"]]
        assert [known[p] for p in pixels] == labels
        per_rank.append(pixels)
    source = F.open_labelled(spec)
    part1 = [item.key for item in source.iter_partition(source.partitions()[1])]  # rank 1's only partition
    n1 = len(part1)
    assert 0 < n1 < 20  # 3 partitions by key hash over 40 items: rank 1 must cycle to fill 4 x 5
    assert set(per_rank[1][:n1]) == {whole.pixels[whole.keys.index(k)].tobytes() for k in part1}
    assert per_rank[1][n1:] == per_rank[1][: 20 - n1]  # cycled, in the same order within the epoch
    assert not set(per_rank[0]) & set(per_rank[1][:n1])
    aug = next(iter(LabelledStream(spec, 32, batch_size=5, augment=True, seed=1)))
    assert aug["image"].dtype == torch.uint8 and not any(p.numpy().tobytes() in known for p in aug["image"])
