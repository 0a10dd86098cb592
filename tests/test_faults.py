"""Faults the stages must survive: a Ray Train worker SIGKILLed mid-run, an output location that
cannot be written, a disk that fills up mid-shard. Real Ray, real files; the disk-full case uses a
real tiny tmpfs when this machine lets us mount one (root), else it is skipped."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_kill import kill_when_registered  # noqa: E402
from test_cache_support import make_tokenizer  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pretrain.checkpoint import read_metrics, read_state  # noqa: E402
from cache_fixture import PatchColorTokenizer, write_cache  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.train import run_pretrain  # noqa: E402

TOK = PatchColorTokenizer((4, 4), 32)
STEPS = 40


# --------------------------------------------------------------------------------------------------
# A Ray Train worker killed mid-run


def _last_step(run_dir: Path) -> int:
    try:
        return max((r.get("step", 0) for r in read_metrics(str(run_dir)) if r["kind"] == "step"), default=0)
    except Exception:  # not written yet, or a line half written
        return 0


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_train_worker_sigkill_restarts_from_checkpoint(ray_local, tmp_path):
    """The default config (no max_failures set) replaces a SIGKILLed worker inside the same run."""
    cache = tmp_path / "tokens" / TOK.tokenizer_id
    write_cache(str(cache), TOK, "shapes?n=32&size=32&seed=5", [16, 16])
    out = tmp_path / "runs"
    cfg = load_config(PretrainConfig, None, [
        f"data.tokens={cache}", "data.img_size=32", "data.batch_size=8", "data.loader_workers=0",
        "data.shuffle_buffer=16", "model.dim=32", "model.depth=2", "model.heads=2", "model.patch=8",
        "mask.num_masked=6", "mask.min_block=2", "optim.lr=2e-3", "optim.warmup_steps=2",
        f"steps={STEPS}", "checkpoint_every=4", "keep_checkpoints=20", "workers=2",
        f"out={out}", "run_name=killed", "log_every=1",
    ])
    run_dir = out / "killed"
    done, seen = threading.Event(), {}
    killer = threading.Thread(target=kill_when_registered, daemon=True,
                              args=(run_dir, "checkpoint_00000008", 2, done, seen, lambda: {"last_step": _last_step(run_dir)}))
    killer.start()
    try:
        result = run_pretrain(cfg, log=lambda s: None)
    finally:
        done.set()
        killer.join(timeout=10)
    assert "killed" in seen, f"no worker was killed before the run ended: {seen}"
    assert "error" not in seen, seen

    assert result.metrics["step"] == STEPS
    assert result.checkpoint_dir == str(run_dir / f"checkpoint_{STEPS:08d}")
    assert read_state(result.checkpoint_dir)["step"] == STEPS
    records = read_metrics(str(run_dir))
    resumes = [r for r in records if r["kind"] == "resume"]
    summary = [(r["kind"], r.get("step")) for r in records]
    assert len(resumes) == 1, (result.metrics, seen, summary)
    registered = max(int(n.split("_")[1]) for n in seen["registered"])
    # restarted from the newest registered checkpoint (one registered between the kill and the restart
    # is as good), never from scratch and never past what had been trained
    assert resumes[0]["step"] % 4 == 0 and registered <= resumes[0]["step"] <= seen["last_step"] + 4, (resumes, seen)
    assert result.metrics["start_step"] == resumes[0]["step"]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, STEPS + 1))
    assert (run_dir / "encoder" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# An output location that cannot be written


def _tokens_build(tok: str, out: str, n: int = 16, size: int = 16) -> tuple[int, str]:
    """`mimflow tokens build` in a subprocess (its own embedded Ray): (exit code, stderr)."""
    r = subprocess.run(
        [sys.executable, "-m", "mimflow", "tokens", "build", "--tokenizer", tok,
         "--source", f"shapes?n={n}&size={size}&partition_size={n}", "--out", out, "--num-cpus", "1",
         "--actors", "1"],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    return r.returncode, r.stderr


def _shards(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".tar" in p.name) if root.is_dir() else []


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_tokens_build_to_an_unwritable_location_is_a_clear_error(tmp_path):
    """Root ignores chmod, so the output sits under a regular file: not creatable, even for root."""
    tok = make_tokenizer(tmp_path / "tok")
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    bad = blocker / "tokens"
    rc, err = _tokens_build(tok, str(bad))
    assert rc == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert any(str(blocker) in ln for ln in lines), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert blocker.read_text() == "not a directory"
    assert not any(p.name.endswith(".tar") for p in tmp_path.rglob("*"))


@pytest.fixture()
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_atomic_output_on_a_full_disk_leaves_nothing(tiny_tmpfs):
    """A real ENOSPC inside the write: no file under the final name, no temporary left."""
    target = tiny_tmpfs / "cache" / "shard-000000.tar"
    with pytest.raises(OSError) as e:
        storage.write_bytes_atomic(str(target), os.urandom(256 * 1024))
    assert e.value.errno == errno.ENOSPC and "No space left" in str(e.value)
    assert str(target) in str(e.value)  # the error names the file
    assert not target.exists()
    assert [p.name for p in (tiny_tmpfs / "cache").iterdir()] == []
    storage.write_bytes_atomic(str(target), b"small")  # the space was given back
    assert target.read_bytes() == b"small"


def test_atomic_output_error_mid_stream_leaves_nothing(tmp_path):
    """An error raised between writes (the writer's own failure) removes the temporary too."""
    target = tmp_path / "shard-000001.tar"
    with pytest.raises(OSError):
        with storage.atomic_output(str(target)) as f:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_tokens_build_on_a_full_disk_is_a_clear_error(tmp_path, tiny_tmpfs):
    """The cache root on a 32 KiB tmpfs, a shard larger than that: the build fails with a one-line
    error, and no shard is left as if complete (no .tar, no temporary, no manifest)."""
    tok = make_tokenizer(tmp_path / "tok")
    rc, err = _tokens_build(tok, str(tiny_tmpfs / "tokens"), n=32, size=48)
    assert rc != 0, err[-3000:]
    names = [p.name for p in tiny_tmpfs.rglob("*") if p.is_file()]
    assert not any(n.endswith(".tar") or ".tmp-" in n for n in names), names
    assert "manifest.parquet" not in names, names
    errors = [ln for ln in err.splitlines() if ln.startswith("mimflow tokens: error:")]
    assert len(errors) == 1 and "No space left" in errors[0], err[-3000:]
    assert str(tiny_tmpfs / "tokens") in errors[0], errors[0]  # names where it could not write
    assert rc == 2, err[-3000:]
    # one line a user can act on, not a remote traceback pasted into the message
    assert "Traceback" not in err and 'File "' not in err, err[-3000:]
