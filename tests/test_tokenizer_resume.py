"""Tokenizer training interrupted mid-run: it resumes from the last registered checkpoint and ends with
exactly the tokenizer an uninterrupted run makes.

The interruption is real: the Ray Train worker process is SIGKILLed once Ray Train has registered the
checkpoint of epoch 4 of 8 (as tests/test_faults.py does for pretraining). With the default config
(``max_failures`` 3, through ``pipeline.train_harness``) Ray Train replaces the worker inside the same
run; with ``max_failures=0`` the run fails and the user's rerun of the same config (same run name and
storage path) resumes instead. Either way the worker picks the run's latest checkpoint up through
``ray.train.get_checkpoint()`` and restores the weights, the codebook's training state (initialised, EMA
sizes, usage, step count, recent outputs), AdamW's state, the history and torch's RNG state (dead-code
restarts draw from it: without it the resumed run diverged from epoch 5 on). The reference is the
same config trained without interruption in local mode (``num_workers=0``): with one worker there is
no DDP either way, and the two give bit-identical weights (same seeds, same data order, one torch
thread), so the comparison can be exact.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_kill import kill_when_registered, registered_checkpoints  # noqa: E402
from test_tokenizer_train import TINY_VQKD  # noqa: E402

from pipeline.errors import StageError  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from tokenizer.checkpoint import tokenizer_id  # noqa: E402
from tokenizer.checkpoint import load_tokenizer
from tokenizer.train import train_tokenizer  # noqa: E402
from tokenizer.train_config import TokenizerTrainConfig  # noqa: E402

EPOCHS = 8
STEPS = 6  # per epoch: 96 training images, batch 16, one worker
KILL_AFTER = "epoch-0004"  # registered checkpoint that triggers the kill
# The codebook starts at step round(0.25 * 48) = 12, i.e. with epoch 3: by the kill it has been
# k-means-initialised, EMA-updated and had dead codes restarted (random picks from torch's global RNG).
SETTINGS = [*TINY_VQKD, f"epochs={EPOCHS}", "codebook_warmup=0.25", "restart_every=4"]
TIMING_KEYS = ("seconds", "cpu_seconds")


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _adam_steps(state: dict) -> set[int]:
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """The same training, uninterrupted, in the driver process (shared by both tests)."""
    root = tmp_path_factory.mktemp("reference")
    storage = root / "ray"
    ref_out = root / "reference"
    ref_cfg = load_config(TokenizerTrainConfig, "vqkd_demo",
                          [*SETTINGS, "num_workers=0", f"out={ref_out}", f"storage_path={storage}", "run_name=reference"])
    train_tokenizer(ref_cfg, log=lambda s: None)
    ref = json.loads((ref_out / "train.json").read_text())
    assert [h["epoch"] for h in ref["history"]] == list(range(1, EPOCHS + 1))
    assert sum(h["restarted_codes"] for h in ref["history"][4:]) > 0  # the RNG matters after the resume point
    return ref_out, ref


def _train_and_kill(cfg, run_dir: Path) -> tuple[dict, Exception | None]:
    """Train with one Ray Train worker, SIGKILLed after the checkpoint of epoch 4 is registered."""
    done, seen = threading.Event(), {}
    killer = threading.Thread(target=kill_when_registered, args=(run_dir, KILL_AFTER, 1, done, seen), daemon=True)
    killer.start()
    error = None
    try:
        train_tokenizer(cfg, log=lambda s: None)
    except StageError as e:
        error = e
    finally:
        done.set()
        killer.join(timeout=10)
    assert "killed" in seen and "error" not in seen, seen
    return seen, error


def _assert_matches_reference(out: Path, run_dir: Path, ref_out: Path, ref: dict, resumed_from: int, run_name: str):
    meta = json.loads((out / "train.json").read_text())
    assert meta["resumed_from_epoch"] == resumed_from
    assert meta["fingerprint"] == ref["fingerprint"] and meta["run_name"] == run_name
    assert [h["epoch"] for h in meta["history"]] == list(range(1, EPOCHS + 1))  # no epoch lost or counted twice
    assert _untimed(meta["history"]) == _untimed(ref["history"])
    assert meta["tokenizer_id"] == ref["tokenizer_id"] == tokenizer_id(out) == load_tokenizer(out).tokenizer_id
    assert meta["heldout"] == ref["heldout"]
    final = torch.load(run_dir / f"epoch-{EPOCHS:04d}" / "state.pt", map_location="cpu", weights_only=True)
    assert final["epoch"] == EPOCHS - 1
    assert _adam_steps(final) == {EPOCHS * STEPS}  # Adam's count went on from the checkpoint's, not from 0
    assert int(final["quantizer"]["steps"]) == EPOCHS * STEPS - 12  # codebook warm-up counted once
    ref_tok, tok = load_tokenizer(ref_out), load_tokenizer(out)
    assert _digest(tok.export_state_dict()) == _digest(ref_tok.export_state_dict())
    assert torch.equal(tok.codebook(), ref_tok.codebook())


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_killed_worker_resumes_inside_the_run_with_the_default_config(reference, tmp_path):
    storage = tmp_path / "ray"
    ref_out, ref = reference
    out = tmp_path / "tok"
    cfg = load_config(TokenizerTrainConfig, "vqkd_demo",
                      [*SETTINGS, "num_workers=1", f"out={out}", f"storage_path={storage}", "run_name=inrun"])
    assert cfg.max_failures >= 1  # the default: a killed worker is replaced, from the newest checkpoint
    run_dir = storage / "inrun"
    seen, error = _train_and_kill(cfg, run_dir)
    assert error is None, error  # one call: the run itself recovered
    killed_after = max(int(name.split("-")[1]) for name in seen["registered"])
    resumed_from = json.loads((out / "train.json").read_text())["resumed_from_epoch"]
    assert killed_after <= resumed_from < EPOCHS, (resumed_from, seen)  # restarted after the kill, not from scratch
    _assert_matches_reference(out, run_dir, ref_out, ref, resumed_from, "inrun")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_interrupted_vqkd_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
    storage = tmp_path / "ray"
    ref_out, ref = reference

    # 1) no restarts allowed (max_failures=0): the kill ends the run.
    out = tmp_path / "tok"
    cfg = load_config(TokenizerTrainConfig, "vqkd_demo",
                      [*SETTINGS, "num_workers=1", f"out={out}", f"storage_path={storage}", "run_name=interrupted",
                       "max_failures=0"])
    assert cfg.checkpoint_every == 1  # every epoch is checkpointed (the default)
    run_dir = storage / "interrupted"
    seen, error = _train_and_kill(cfg, run_dir)
    assert error is not None and "tokenizer training failed" in str(error), seen
    assert not (out / "train.json").exists()
    registered = registered_checkpoints(run_dir)  # what the rerun will see
    last = max(int(name.split("-")[1]) for name in registered)
    assert 4 <= last < EPOCHS, (registered, seen)  # interrupted partway, after the kill point
    saved = torch.load(run_dir / f"epoch-{last:04d}" / "state.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == last - 1 and [h["epoch"] for h in saved["history"]] == list(range(1, last + 1))
    assert _adam_steps(saved) == {last * STEPS} and "cpu" in saved["rng"]
    assert bool(saved["quantizer"]["initted"]) and int(saved["quantizer"]["steps"]) == last * STEPS - 12
    # the first `last` epochs were the reference's epochs exactly
    assert _untimed(saved["history"]) == _untimed(ref["history"][:last])

    # 2) the same command again: resumes after epoch `last`, trains only the remaining epochs, and ends
    # with the reference's tokenizer, bit for bit.
    train_tokenizer(cfg, log=lambda s: None)
    _assert_matches_reference(out, run_dir, ref_out, ref, last, "interrupted")
