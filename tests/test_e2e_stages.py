"""Stage 1 and stage 2 through a real Ray head started by the local cluster script, submitted with
`ray job submit` (the infra.submit wrapper), outputs verified here; plus a wrong argument that must
fail fast with the stage's own error in the job logs. One head for the module, stopped by PID."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # infra/ is tooling, not part of the installed package
    sys.path.insert(0, str(REPO))

from infra import local_cluster as lc  # noqa: E402
from infra import submit as sub  # noqa: E402

SMALL_STORE = 100 * 2**20

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster():
    # a short temp dir: Ray's unix socket paths must fit in 107 bytes
    root = Path(tempfile.mkdtemp(prefix="mf-e2e-", dir="/tmp"))
    try:
        with lc.start_cluster(4, root / "state", object_store_memory=SMALL_STORE) as info:
            yield info
        assert not info.is_running()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _status(cluster, job_id: str) -> str:
    """The job's status from the job API (SUCCEEDED, FAILED, ...)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/{job_id}", headers=cluster.auth_headers())
    with opener.open(req, timeout=30) as r:
        return json.loads(r.read())["status"]


def _logs(cluster, job_id: str) -> str:
    r = cluster.job_cli("logs", job_id, timeout=60)
    return r.stdout + r.stderr


def _submit(cluster, stage: str, args: list[str], timeout: float):
    return sub.submit(stage, args, state_dir=cluster.state_dir, capture=True, timeout=timeout)


def _stage1_recipe(work: Path) -> Path:
    recipe = {
        "tokenizer": {
            "source": "shapes?n=64&size=16&partition_size=32",
            "out": str(work / "tokenizer"),
            "model": {"kind": "vqkd", "vocab_size": 32, "grid": 4, "input_size": 16,
                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "width": 16, "depth": 1,
                      "num_heads": 2, "mlp_ratio": 2.0, "code_dim": 8, "decoder_depth": 1},
            "teacher": "hog",
            "epochs": 1,
            "batch_size": 16,
            "warmup_epochs": 0.5,
            "heldout_size": 16,
            "kmeans_iters": 2,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "storage_path": str(work / "ray"),
            "seed": 0,
        },
        "tokens": {"out": str(work / "tokens"), "batch_size": 32, "actors": 1, "views": 1},
    }
    path = work / "stage1.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.timeout(420)
def test_stage1_then_stage2_through_ray_job_submit(cluster, work):
    from mimflow.cli import main as mimflow
    from pretrain.export import load_encoder
    from tokenizer.cache_verify import verify_cache

    # ---- stage 1: tokenizer + token cache, one job
    t0 = time.perf_counter()
    r1 = _submit(cluster, "tokenizer", ["--config", str(_stage1_recipe(work))], timeout=300)
    logs1 = _logs(cluster, r1.job_id)
    assert r1.returncode == 0, logs1[-4000:]
    assert "SUCCEEDED" == _status(cluster, r1.job_id)
    result = json.loads([ln for ln in logs1.splitlines() if ln.startswith("{\"tokenizer\"")][-1])
    cache, tok = Path(result["cache"]), Path(result["tokenizer"])
    assert cache.parent == work / "tokens" and cache.name == result["tokenizer_id"]
    assert tok.is_relative_to(work) and (tok / "model.safetensors").is_file()
    assert result["samples"] == 64 and result["errors"] == 0
    report = verify_cache(str(cache))
    assert report.ok, report.summary()
    assert mimflow(["tokens", "verify", str(cache)]) == 0
    t1 = time.perf_counter() - t0

    # ---- stage 2: 2 Ray Train workers, a few steps
    out = work / "runs"
    args = ["--config", "demo",
            "--set", f"data.tokens={cache}", "--set", f"data.tokenizer={tok}", "--set", f"out={out}",
            "--set", "data.img_size=16", "--set", "data.batch_size=8", "--set", "data.loader_workers=0",
            "--set", "data.shuffle_buffer=16", "--set", "model.dim=32", "--set", "model.depth=1",
            "--set", "model.heads=2", "--set", "model.patch=4", "--set", "mask.num_masked=6",
            "--set", "mask.min_block=2", "--set", "optim.warmup_steps=1", "--set", "steps=4",
            "--set", "checkpoint_every=2", "--set", "workers=2", "--set", "cpus_per_worker=1",
            "--set", "run_name=e2e", "--set", "log_every=1"]
    r2 = _submit(cluster, "pretrain", args, timeout=300)
    logs2 = _logs(cluster, r2.job_id)
    assert r2.returncode == 0, logs2[-4000:]
    assert "SUCCEEDED" == _status(cluster, r2.job_id)
    run = out / "e2e"
    ckpt = run / "checkpoint_00000004"
    assert ckpt.is_dir(), sorted(p.name for p in run.iterdir())
    from pretrain.checkpoint import read_metrics, read_state

    state = read_state(ckpt)
    assert state["step"] == 4 and state["tokenizer_id"] == result["tokenizer_id"]
    steps = [r for r in read_metrics(str(run)) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    model, enc_cfg = load_encoder(run / "encoder")
    assert enc_cfg["step"] == 4
    import torch

    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, 3, 16, 16))
    assert feats.shape == (1, 1 + 16, 32)
    print(f"stage1 {t1:.0f}s, stage2 {time.perf_counter() - t0 - t1:.0f}s")


@pytest.mark.timeout(180)
def test_wrong_argument_fails_fast_with_the_stage_error(cluster):
    t0 = time.perf_counter()
    res = _submit(cluster, "pretrain", ["--config", "demo", "--set", "model.dimm=3"], timeout=170)
    took = time.perf_counter() - t0
    assert res.returncode != 0
    assert "FAILED" == _status(cluster, res.job_id)
    logs = _logs(cluster, res.job_id)
    assert "python -m pretrain: error:" in logs and "unknown key 'model.dimm'" in logs, logs
    assert "Traceback" not in logs and "ray/_private" not in logs, logs
    assert took < 60, f"a wrong argument took {took:.0f} s to fail"
