"""infra/: the loopback Ray head (start/status/env/stop by PID) and the `ray job submit` wrapper (the
manifests: tests/test_infra_manifests.py). The e2e tests start real heads; the rest start nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # infra/ is tooling, not part of the installed package
    sys.path.insert(0, str(REPO))

from infra import cluster_ports, cluster_procs, cluster_state  # noqa: E402
from infra import local_cluster as lc  # noqa: E402
from infra import submit as sub  # noqa: E402
from infra import submit_paths, submit_upload  # noqa: E402

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
SMALL_STORE = str(100 * 2**20)  # object store bytes for test heads (Ray's minimum is ~75 MiB)


# --------------------------------------------------------------------------------------------------
# Submit wrapper (no cluster)


def test_submit_command_per_stage(tmp_path):
    for stage, tail in (("tokenizer", ["python", "-m", "tokenizer"]), ("pretrain", ["python", "-m", "pretrain"]),
                        ("eval", ["python", "-m", "eval"]),
                        ("codebook", ["python", "-m", "mimflow", "codebook", "report"]),
                        ("refresh", ["python", "-m", "mimflow", "tokens", "refresh"])):
        cmd = sub.build_command(stage, ["--config", "demo"], address="http://127.0.0.1:1", submission_id="j1",
                                working_dir=tmp_path, no_wait=True)
        cut = cmd.index("--")
        assert cmd[cut + 1:] == tail + ["--config", "demo"]
        assert cmd[cmd.index("--address") + 1] == "http://127.0.0.1:1"
        assert "--no-wait" in cmd[:cut] and cmd[cmd.index("--submission-id") + 1] == "j1"
        renv = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
        for must in (".git", ".venv", "/runs", "/demo-out", "/bench/results", "/data", "auth_token", ".env"):
            assert must in renv["excludes"], must
        assert renv["env_vars"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # no watcher error per run
    no_upload = sub.build_command("eval", [], address="http://x:1", submission_id="j", working_dir=None,
                                  env_vars={"A": "1"})
    assert "--working-dir" not in no_upload
    renv = json.loads(no_upload[no_upload.index("--runtime-env-json") + 1])
    assert renv == {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "A": "1"}}
    with pytest.raises(sub.SubmitError, match="unknown stage"):
        sub.build_command("train", [], address="http://x:1", submission_id="j", working_dir=None)


def test_relative_data_paths_are_warned_about(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("tokens:\n  out: rel/tokens\nsource: /abs/images\nepochs: 3\n")
    warns = submit_paths.relative_path_warnings(
        ["--source", "images", "--out=/abs/out", "--tokens", "s3://b/t", "--set", "data.tokens=runs/tok",
         "--set", "data.tokenizer=/abs/tok", "--set", "optim.lr=1e-3", "--set", "source=shapes?n=10",
         "--train", "idx:data/mnist?split=train", "--test", "idx:/data/mnist?split=test",
         "--encoder", "~/enc", "--config", str(cfg), "--config", "demo"], cwd=tmp_path)
    flagged = [w.split(" is a relative path")[0] for w in warns]
    assert flagged == ["--source 'images'", "--set data.tokens='runs/tok'", "--train 'idx:data/mnist?split=train'",
                       "--encoder '~/enc'", f"{cfg}: tokens.out='rel/tokens'"], flagged
    assert all("absolute path" in w and "URI" in w for w in warns)


def test_upload_estimate_follows_excludes_and_gitignore(tmp_path):
    wd = tmp_path / "wd"
    files = {
        "pkg/a.py": 10, ".gitignore": 6, "pkg/x.log": 5000,
        ".git/objects/big": 3_000_000, ".venv/lib/big.so": 3_000_000, "data/images.tar": 3_000_000,
        "runs/ckpt.pt": 3_000_000, "pkg/__pycache__/a.pyc": 100, ".env": 20, "auth_token": 64,
        "pkg/data/keep.txt": 7,  # only a top-level data/ is excluded
    }
    for rel, size in files.items():
        p = wd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"*.log\n" if rel == ".gitignore" else b"x" * size)
    est = submit_upload.estimate_upload(wd, submit_upload.DEFAULT_EXCLUDES)
    assert est is not None
    assert sorted(p for _, p in est.largest) == [".gitignore", "pkg/a.py", "pkg/data/keep.txt"]
    assert est.files == 3 and est.bytes == 23

    with pytest.raises(sub.SubmitError, match="over Ray's"):  # refused here, before Ray is asked
        sub.submit("eval", [], address="http://127.0.0.1:9", working_dir=wd, max_upload_mib=1e-5, dry_run=True)
    res = sub.submit("eval", ["--config", "demo"], address="http://127.0.0.1:9", working_dir=wd, dry_run=True)
    assert res.command[-4:] == ["-m", "eval", "--config", "demo"]

    repo = submit_upload.estimate_upload(REPO, submit_upload.DEFAULT_EXCLUDES)  # the real upload stays far below 100 MiB
    assert repo.mib < submit_upload.UPLOAD_LIMIT_MIB / 4, repo.largest
    assert not any(p.startswith((".git/", ".venv/")) for _, p in repo.largest)


def test_submit_without_a_cluster_says_how_to_get_one(tmp_path):
    with pytest.raises(sub.SubmitError, match="python -m infra.local_cluster start"):
        sub.resolve_target(None, tmp_path / "no-cluster")
    t = sub.resolve_target("http://10.0.0.1:8265", tmp_path / "no-cluster")
    assert t.address == "http://10.0.0.1:8265"
    t = sub.resolve_target(None, None, base_env={"RAY_API_SERVER_ADDRESS": "http://h:8265"})
    assert t.address == "http://h:8265"


# --------------------------------------------------------------------------------------------------
# Local cluster, without starting one


def test_ports_are_free_distinct_and_outside_the_ephemeral_range():
    import random

    singles, (wlo, whi) = cluster_ports.pick_ports(random.Random(0))
    assert set(singles) == set(cluster_ports.SINGLE_PORTS)
    ports = list(singles.values()) + list(range(wlo, whi + 1))
    assert whi - wlo + 1 == cluster_ports.WORKER_PORTS and len(set(ports)) == len(ports)
    eph_lo, eph_hi = cluster_ports.ephemeral_range()
    assert not any(eph_lo <= p <= eph_hi for p in ports)
    assert all(p >= 20000 for p in ports)  # clear of Ray's defaults (6379, 8265, 10001, 10002-19999)


def test_start_refuses_a_temp_dir_too_long_for_ray_sockets(tmp_path):
    long_dir = tmp_path / ("x" * 60)
    with pytest.raises(cluster_state.ClusterError, match="107 bytes"):
        lc.start_cluster(1, tmp_path / "state", long_dir)
    assert cluster_state.load_cluster(tmp_path / "state") is None


def test_status_and_stop_without_a_cluster(tmp_path, capsys):
    assert lc.cluster_status(tmp_path)["state"] == "absent"
    assert cluster_procs.stop_cluster(tmp_path) == []
    assert lc.main(["status", "--state-dir", str(tmp_path)]) == 1
    assert "no cluster recorded" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Real heads


def _http_status(url: str, headers: dict[str, str]) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _shell_env(text: str, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    for line in text.splitlines():
        words = shlex.split(line)
        if words and words[0] == "export":
            k, _, v = words[1].partition("=")
            env[k] = v
        elif words and words[0] == "unset":
            for k in words[1:]:
                env.pop(k, None)
    return env


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_local_cluster_script_start_submit_stop(tmp_path):
    """The script's whole life cycle on one real head: start, status, loopback-only ports, token auth,
    a busy state dir refused, a trivial `ray job submit`, a failing stage job whose own error shows in
    `ray job logs`, stop by PID."""
    state = tmp_path / "cluster"

    def script(*args, timeout=180):
        return subprocess.run([sys.executable, "-m", "infra.local_cluster", "--state-dir", str(state), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    seen: dict[int, int] = {}
    try:
        r = script("start", "--num-cpus", "1", "--object-store-memory", SMALL_STORE)
        assert r.returncode == 0, r.stdout + r.stderr
        info = cluster_state.load_cluster(state)
        assert info is not None and info.auth_mode == "token"
        assert f"RAY_ADDRESS={info.dashboard_url}" in r.stdout and info.address in r.stdout
        assert (info.token_path.stat().st_mode & 0o777) == 0o600

        r = script("status")
        assert r.returncode == 0 and "running" in r.stdout and info.dashboard_url in r.stdout, r.stdout

        for name, port in info.ports.items():  # everything Ray listens on is loopback-only
            addrs = cluster_ports.listening_addresses(port)
            assert addrs and addrs <= cluster_ports.LOOPBACK_HEX, (name, port, addrs)

        jobs_api = info.dashboard_url + "/api/jobs/"
        assert _http_status(jobs_api, {}) == 401  # token auth is on ...
        assert _http_status(jobs_api, info.auth_headers()) == 200  # ... and our token opens it

        r = script("start", "--num-cpus", "1")  # the state dir is busy: refused, nothing started
        assert r.returncode != 0 and "already holds a running Ray cluster" in r.stderr, r.stderr
        assert cluster_state.load_cluster(state).launcher_pid == info.launcher_pid

        r = script("env")
        assert r.returncode == 0 and "RAY_API_SERVER_ADDRESS" in r.stdout
        assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in r.stdout.splitlines()
        # a client shell holding exactly what `env` prints (in a bare environment): the job API and the
        # GCS address both answer (without the loopback line, ray.init(address=...) times out)
        shell = subprocess.run(
            ["bash", "-c", f'eval "$({shlex.quote(sys.executable)} -m infra.local_cluster --state-dir '
                           f'{shlex.quote(str(state))} env)" && ray job list && python -c "import ray; '
                           f"ray.init(address='{info.address}'); print('GCS', ray.cluster_resources()['CPU'])\""],
            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                 "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert shell.returncode == 0, shell.stdout + shell.stderr
        assert "GCS 1.0" in shell.stdout, shell.stdout  # (`ray job list` failing, e.g. 401, stops the && chain)
        env = _shell_env(r.stdout, {k: v for k, v in os.environ.items() if not k.startswith("RAY_")})

        def ray_job(*args):
            return subprocess.run(RAY_CLI + ["job", *args], env=env, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=180)

        job = ray_job("submit", "--", "python", "-c",
                      "import ray; ray.init(); print('RESOURCES', ray.cluster_resources())")
        assert job.returncode == 0, job.stdout + job.stderr
        assert re.search(r"RESOURCES \{.*'CPU': 1\.0", job.stdout), job.stdout
        assert "succeeded" in job.stdout + job.stderr

        # a bad argument, through the stage wrapper (the repo uploaded as the working dir): the job fails
        # fast and `ray job logs` shows the stage's own one-line error, not a stack of Ray internals
        res = sub.submit("pretrain", ["--frobnicate"], state_dir=state, capture=True, timeout=240)
        assert res.returncode != 0 and res.job_id.startswith("mimflow-pretrain-")
        logs = ray_job("logs", res.job_id).stdout
        assert "python -m pretrain: error: unrecognized arguments: --frobnicate" in logs, logs
        assert "Traceback" not in logs

        seen = {pid: p.start for pid, p in cluster_procs.cluster_processes(info).items()} | dict(info.pids)
        assert info.launcher_pid in seen and len(seen) > 5
    finally:
        r = script("stop", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    still = [pid for pid, start in seen.items() if cluster_procs.pid_alive(pid, start)]
    assert still == [], f"processes left after stop: {still}"
    assert cluster_procs.processes_referencing(info.temp_dir) == []
    assert not info.temp_dir.exists() and not info.token_path.exists()
    r = script("status")
    assert r.returncode == 1 and "no cluster recorded" in r.stdout


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_start_cluster_context_manager(tmp_path):
    """The Python API the stage e2e tests build on: start in-process, refuse a second start on the same
    state dir, stop on leaving the block with nothing left behind (no zombie either)."""
    state = tmp_path / "cluster"
    with lc.start_cluster(1, state, object_store_memory=int(SMALL_STORE)) as cluster:
        assert cluster.is_running() and cluster_state.load_cluster(state).tag == cluster.tag
        assert cluster.client_env({})["RAY_AUTH_TOKEN_PATH"] == str(cluster.token_path)
        with pytest.raises(cluster_state.ClusterBusyError, match="already holds a running Ray cluster"):
            lc.start_cluster(1, state)
        pids = {pid: p.start for pid, p in cluster_procs.cluster_processes(cluster).items()}
    assert not any(cluster_procs.pid_alive(pid, start) for pid, start in pids.items())
    assert not Path(f"/proc/{cluster.launcher_pid}").exists()  # reaped, not a zombie
    assert cluster_procs.processes_referencing(cluster.temp_dir) == []
    assert cluster_state.load_cluster(state) is None
