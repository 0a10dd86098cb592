"""Kill a Ray Train worker at a known point: the SIGKILL half of the fault and resume tests."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable


def alive_train_workers() -> list[int]:
    """PIDs of this test's live Ray Train workers."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this test's Ray, not any other on the machine
    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return [a.pid for a in actors if a.pid]


def registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train's controller has registered (its snapshot file; Ray 2.60 layout)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return sorted(c["checkpoint_dir_name"] for c in snap["checkpoint_results"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def kill_when_registered(run_dir: Path, checkpoint: str, workers: int, done: threading.Event, seen: dict[str, Any],
                         at_kill: Callable[[], dict[str, Any]] = dict) -> None:
    """Thread body: learn the workers' PIDs, wait until `checkpoint` is registered, SIGKILL the last one.

    A checkpoint directory appears before the controller registers it, and a restart (or a rerun) only
    sees registered ones, hence the wait on the snapshot. ``seen`` gets ``pids``, ``killed``,
    ``registered`` and whatever ``at_kill()`` returns at that moment; ``error`` if something broke.
    """
    try:
        deadline = time.monotonic() + 240
        pids: list[int] = []
        while not done.is_set() and time.monotonic() < deadline and len(pids) < workers:
            try:
                pids = alive_train_workers()
            except Exception as e:  # the state API may not answer in the first seconds
                seen["list_error"] = repr(e)
            time.sleep(0.2)
        seen["pids"] = pids
        while not done.is_set() and time.monotonic() < deadline:
            registered = registered_checkpoints(run_dir)
            if checkpoint in registered:
                os.kill(pids[-1], signal.SIGKILL)
                seen.update(killed=pids[-1], registered=registered, **at_kill())
                return
            time.sleep(0.02)
    except Exception as e:  # reported by the test
        seen["error"] = repr(e)
