"""Token cache build: round trip, determinism, bad inputs, kill -9 and resume (real Ray, real tars)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.images import decode_rgb, encode_png
from pipeline.token_cache import check_cache, decode_sample, read_errors, shard_urls
from pipeline.tensors import to_tensor
from pipeline.views import render_view
from slow_partitions import driver_code
from test_cache_support import make_tokenizer, manifest_without_time, read_cache
from tokenizer.precompute import build_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok", seed=0)


@pytest.mark.slow
def test_round_trip_determinism_and_webdataset(ray_local, tok_dir, shapes_spec, tmp_path):
    from tokenizer.checkpoint import load_tokenizer

    a = build_cache(tok_dir, shapes_spec, str(tmp_path / "a"), views=2, batch_size=5, num_actors=2, seed=3).cache_dir
    b = build_cache(tok_dir, shapes_spec, str(tmp_path / "b"), views=2, batch_size=16, num_actors=1, seed=3).cache_dir
    tok = load_tokenizer(tok_dir)
    assert Path(a).name == tok.tokenizer_id and Path(a).parent == tmp_path / "a"

    info, rows = check_cache(a, tok.tokenizer_id)
    assert [r["shard"] for r in rows] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert info.views == 2 and info.seed == 3 and info.grid == list(tok.grid)
    assert info.vocab_size == tok.vocab_size and info.input_size == tok.input_size
    assert info.samples == 48 and info.errors == 0 and info.source == shapes_spec
    assert info.kind == tok.kind and info.partitions == 3 and info.source_fingerprint

    # Same input, other batch size and actor count: identical shards and manifests (but for times).
    assert manifest_without_time(a) == manifest_without_time(b)
    for r in rows:
        assert (Path(a) / r["shard"]).read_bytes() == (Path(b) / r["shard"]).read_bytes()

    # Round trip: the stored tokens of every view are the tokenizer's encode of the view rebuilt
    # from views.json; the image bytes are the source's, unchanged.
    from pipeline.sources import open_source, read_all

    source_bytes = {s.key: s.data for s in read_all(open_source(shapes_spec))[0]}
    samples = read_cache(a)
    assert len(samples) == 48 and len({s.key for s in samples}) == 48
    views, tokens = [], []
    for s in samples:
        assert s.image == source_bytes[s.key] and s.fmt == "png" and s.label is not None
        assert s.tokens.dtype == np.uint16 and s.tokens.shape == (2, *tok.grid)
        img = decode_rgb(s.image)
        for v, view in enumerate(s.views):
            views.append(to_tensor(render_view(img, view, tok.input_size)))
            tokens.append(s.tokens[v])
    with torch.inference_mode():
        expected = tok.encode(torch.stack(views)).numpy()
    np.testing.assert_array_equal(np.stack(tokens).astype(np.int64), expected)
    assert len({tuple(s.views[0].box) for s in samples}) > 1  # V=2: random crops, not all centred

    # What pretraining does: check_cache + webdataset over the manifest's shard URLs.
    import webdataset as wds

    ds = wds.WebDataset(shard_urls(a, rows), shardshuffle=False).map(decode_sample)
    keys = [s.key for s in ds]
    assert sorted(keys) == sorted(source_bytes)


def _folder_with_bad_inputs(root: Path) -> str:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
            (root / cls / f"img{i}.png").write_bytes(encode_png(pixels))
    whole = encode_png(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    (root / "cat" / "broken.png").write_bytes(whole[: len(whole) // 2])  # truncated mid-data
    (root / "dog" / "notes.txt").write_text("not an image")
    return f"{root}?partition_size=4"


def test_bad_inputs_go_to_errors_and_counts_add_up(ray_local, tok_dir, tmp_path, capsys):
    from mimflow.cli import main

    spec = _folder_with_bad_inputs(tmp_path / "imgs")
    out = tmp_path / "cache"
    rc = main(["tokens", "build", "--tokenizer", tok_dir, "--source", spec, "--out", str(out), "--actors", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tokens: 3/3 shards" in printed and "images/s" in printed and "ETA" in printed
    cache_dir = printed.strip().splitlines()[-1]
    info, rows = check_cache(cache_dir)
    errors = read_errors(cache_dir, info)
    assert sorted(e["key"].rsplit("-", 1)[0] for e in errors) == ["cat_broken", "dog_notes"]  # key: prefix-hash
    reasons = {e["key"].rsplit("-", 1)[0]: e["reason"] for e in errors}
    assert "decode" in reasons["cat_broken"] and "not an image" in reasons["dog_notes"]
    assert all(e["source"].endswith(("broken.png", "notes.txt")) for e in errors)
    assert sum(r["samples"] for r in rows) == 10 == info.samples
    assert info.samples + info.errors == info.source_size == 12
    assert {s.label for s in read_cache(cache_dir)} == {0, 1} and info.classes == ["cat", "dog"]


def _records(cache_dir: Path) -> list[dict]:
    build = cache_dir / "_build"
    return [json.loads(p.read_text()) for p in build.glob("part-*.json")] if build.is_dir() else []


def _wait_for_records(cache_dir: Path, n: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = _records(cache_dir)
        if len(recs) >= n:
            return recs
        time.sleep(0.05)
    raise AssertionError(f"no {n} finished partitions in {cache_dir} after {timeout}s")


def _slow_build(ray_local, build_call: str, delay_s: float) -> subprocess.Popen:
    """A driver process on the session Ray whose cache actors pause ``delay_s`` per partition."""
    address = ray_local.get_runtime_context().gcs_address
    code = driver_code(address, str(REPO / "tests"), delay_s, build_call)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_actor_is_restarted_and_the_build_completes(ray_local, tok_dir, tmp_path):
    from tokenizer.checkpoint import load_tokenizer

    spec = "shapes?n=40&size=32&seed=1&partition_size=5"
    out = tmp_path / "out"
    cache_dir = out / load_tokenizer(tok_dir).tokenizer_id
    proc = _slow_build(ray_local, f"build_cache({tok_dir!r}, {spec!r}, {str(out)!r}, batch_size=8, num_actors=1)", 0.3)
    try:
        first = _wait_for_records(cache_dir, 1)[0]
        os.kill(first["worker"]["pid"], signal.SIGKILL)  # the actor process, mid-build
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    pids = {r["worker"]["pid"] for r in _records(cache_dir)}
    assert len(pids) >= 2  # a restarted actor finished the job
    info, rows = check_cache(str(cache_dir))
    keys = [s.key for s in read_cache(str(cache_dir))]
    assert len(keys) == len(set(keys)) == 40 == info.samples and len(rows) == 8


@pytest.mark.slow
def test_driver_killed_mid_build_then_rerun_completes(ray_local, tok_dir, tmp_path):
    """A real build process, kill -9 after some shards; a rerun finishes without redoing them."""
    from tokenizer.checkpoint import load_tokenizer

    spec = "shapes?n=48&size=32&seed=2&partition_size=4"
    out = tmp_path / "out"
    cache_dir = out / load_tokenizer(tok_dir).tokenizer_id
    proc = _slow_build(ray_local, f"build_cache({tok_dir!r}, {spec!r}, {str(out)!r}, batch_size=4, num_actors=2)", 0.4)
    try:
        _wait_for_records(cache_dir, 3, timeout=90)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started: driver + helpers
        proc.wait(timeout=30)
    assert not (cache_dir / "manifest.parquet").exists()  # killed before the commit
    done_before = {r["partition"]: r["sha256"] for r in _records(cache_dir)}
    assert 3 <= len(done_before) < 12

    report = build_cache(tok_dir, spec, str(out), batch_size=4, num_actors=2)
    assert report.reused >= len(done_before) and report.encoded <= 12 - len(done_before)
    assert report.encoded + report.reused == 12
    info, rows = check_cache(str(cache_dir))
    assert len(rows) == 12 and info.samples == 48
    keys = [s.key for s in read_cache(str(cache_dir))]
    assert len(keys) == len(set(keys)) == 48
    by_part = {int(r["shard"][6:12]): r["sha256"] for r in rows}
    assert all(by_part[p] == sha for p, sha in done_before.items())  # kept, not redone
