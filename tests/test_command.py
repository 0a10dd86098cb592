"""pipeline/command.py: SIGTERM (`ray job stop`, a pod's termination) ends a stage with its one
"rerun to resume" line and exit code 143, never a raw `*** SIGTERM received ***` stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINE = "interrupted; finished work is kept, rerun to resume"


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Read stdout until `marker` shows (stderr is read after the process ends)."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if marker in line:
            return seen
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"{marker!r} never showed:\n{seen}{out}\n{err}")


def test_sigterm_ends_a_command_with_its_line_and_143(tmp_path):
    before = signal.getsignal(signal.SIGTERM)  # (an in-process Ray of another test may have set one)
    code = ("import sys, time\n"
            "from pipeline.command import run_command\n"
            "def cmd():\n"
            "    try:\n"
            "        print('RUNNING', flush=True)  # inside the try: a SIGTERM after it lands there\n"
            "        try:\n"
            "            time.sleep(60)\n"
            "        except KeyboardInterrupt:\n"
            "            raise KeyboardInterrupt() from None  # what ray.get does with it\n"
            "    finally:\n"
            "        print('CLEANED UP', flush=True)\n"
            "sys.exit(run_command('python -m fake', cmd))\n")
    proc = _start(["-c", code], tmp_path)
    _wait_for(proc, "RUNNING", 60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out, err)
    assert err.strip() == f"python -m fake: {LINE}" and "CLEANED UP" in out  # finally blocks ran
    assert signal.getsignal(signal.SIGTERM) is before  # this process: untouched


def test_the_handler_comes_back_after_ray_replaces_it(tmp_path):
    """Without starting Ray: run_command must not import ray itself (ray reads its environment at import,
    before ray_session sets the loopback variable), and after `ray.init` replaced the SIGTERM handler
    (simulated: the same replacement, then Ray's post-init hooks) SIGTERM still gives the line."""
    code = ("import signal, sys, time\n"
            "from pipeline.command import run_command\n"
            "def cmd():\n"
            "    assert 'ray' not in sys.modules, 'run_command imported ray'\n"
            "    from ray._private import worker\n"
            "    signal.signal(signal.SIGTERM, lambda *a: sys.exit(signal.SIGTERM))  # what ray.init does\n"
            "    for hook in worker._post_init_hooks:  # ... and, at its end, this\n"
            "        hook()\n"
            "    print('RUNNING', flush=True)\n"
            "    time.sleep(60)\n"
            "rc = run_command('python -m fake', cmd)\n"
            "from ray._private import worker\n"
            "print('HOOKS LEFT', len(worker._post_init_hooks), flush=True)\n"
            "sys.exit(rc)\n")
    proc = _start(["-c", code], tmp_path)
    _wait_for(proc, "RUNNING", 120)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == f"python -m fake: {LINE}", (out, err)
    assert "HOOKS LEFT 0" in out  # run_command removed its hook again


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_sigterm_to_a_running_stage_after_ray_init(tmp_path):
    """A real stage with its embedded Ray, stopped during Ray Train: Ray's own SIGTERM handlers (a
    sys.exit, then the core worker's failure handler that prints a stack and aborts) are replaced."""
    proc = _start(["-m", "tokenizer", "--config", "vqkd_demo", "--num-cpus", "2",
                   "--set", "source=shapes?n=256&size=64&split=train", "--set", "epochs=200",
                   "--set", "heldout_size=32", "--set", f"out={tmp_path}/tok", "--set", f"tokens.out={tmp_path}/tokens"],
                  tmp_path)
    _wait_for(proc, "[tokenizer]", 300)  # printed by the Ray Train worker: Ray is up, training runs
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-3000:]
    assert err.splitlines().count(f"python -m tokenizer: {LINE}") == 1, err[-3000:]
    assert "SIGTERM received" not in out + err and "Traceback" not in err, err[-3000:]
