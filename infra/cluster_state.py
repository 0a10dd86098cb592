"""A local cluster's record: ``ClusterInfo`` (addresses, ports, auth, PIDs), its state file in the state
dir, the environment a client needs to reach it, and the lock that gives one cluster per state dir."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

DEFAULT_STATE_DIR = Path(os.environ.get("MIMFLOW_CLUSTER_DIR", "~/.mimflow/cluster")).expanduser()
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
LOG_FILE = "ray-start.log"
LOOPBACK = "127.0.0.1"


class ClusterError(RuntimeError):
    """A local cluster could not be started, found or stopped; the message says what to do."""


class ClusterBusyError(ClusterError):
    """The state dir (or temp dir) already belongs to a running cluster."""


# --------------------------------------------------------------------------------------------------
# Cluster description


@dataclasses.dataclass
class ClusterInfo:
    """A local cluster's record, as the state file holds it (the lifecycle is `infra.cluster_procs`:
    `cluster_running`, `stop_this_cluster`, and `Cluster`, what `start_cluster` returns)."""

    state_dir: Path
    temp_dir: Path
    temp_dir_owned: bool  # created by us (removed at stop) or given by the caller (kept)
    address: str  # GCS address, "127.0.0.1:<port>": ray.init(address=...), `mimflow --address`
    dashboard_url: str  # "http://127.0.0.1:<port>": the job API, `ray job submit --address`
    ports: dict[str, int]
    worker_ports: tuple[int, int]
    num_cpus: int
    num_gpus: int | None
    auth_mode: str  # "token" | "disabled"
    token_path: Path | None
    tag: str
    launcher_pid: int  # `ray start --block`, the leader of a new session
    launcher_start: int  # its start time (clock ticks since boot), guards against PID reuse
    pids: dict[int, int]  # pid -> start time, every cluster process seen when the head came up
    log_path: Path
    created: float

    # -- client side -------------------------------------------------------------------------------
    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a `ray job ...` subprocess (or a driver) talking to this cluster.

        Sets RAY_API_SERVER_ADDRESS and RAY_ADDRESS to the dashboard URL, the auth mode and token path,
        drops a stray RAY_AUTH_TOKEN (it would take precedence over the path) and keeps loopback off
        any HTTP proxy. Meant for job-CLI subprocesses: a local `mimflow` run must not inherit an
        http:// RAY_ADDRESS.
        """
        env = dict(os.environ if base is None else base)
        env.pop("RAY_AUTH_TOKEN", None)
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        env["RAY_ADDRESS"] = self.dashboard_url
        env["RAY_AUTH_MODE"] = self.auth_mode
        if self.token_path is not None:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        else:
            env.pop("RAY_AUTH_TOKEN_PATH", None)
        no_proxy = [p for p in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if p]
        for host in (LOOPBACK, "localhost"):
            if host not in no_proxy:
                no_proxy.append(host)
        env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
        return env

    def job_cli(self, *args: str, timeout: float | None = None, cwd: str | Path | None = None,
                check: bool = False) -> subprocess.CompletedProcess:
        """Run `ray job ARGS...` against this cluster (the same Ray as this interpreter), capture text."""
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", *args]
        return subprocess.run(cmd, env=self.client_env(), cwd=cwd, timeout=timeout, check=check,
                              capture_output=True, text=True)

    def auth_headers(self) -> dict[str, str]:
        if self.token_path is None:
            return {}
        return {"Authorization": "Bearer " + self.token_path.read_text().strip()}

    # -- persistence -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("state_dir", "temp_dir", "token_path", "log_path"):
            d[k] = None if d[k] is None else str(d[k])
        d["pids"] = {str(k): v for k, v in self.pids.items()}
        d["worker_ports"] = list(self.worker_ports)
        d["version"] = 1
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ClusterInfo":
        d = dict(d)
        d.pop("version", None)
        for k in ("state_dir", "temp_dir", "log_path"):
            d[k] = Path(d[k])
        d["token_path"] = None if d.get("token_path") is None else Path(d["token_path"])
        d["pids"] = {int(k): int(v) for k, v in d["pids"].items()}
        d["worker_ports"] = tuple(d["worker_ports"])
        return cls(**d)

    def summary(self) -> str:
        auth = "token auth" if self.auth_mode == "token" else "auth DISABLED"
        lines = [
            f"mimflow local Ray cluster: {self.num_cpus} CPUs, {auth}, listening on {LOOPBACK} only",
            f"  GCS address  {self.address}    (ray.init(address=...), mimflow --address)",
            f"  dashboard    {self.dashboard_url}    (job API)",
            f"  temp dir     {self.temp_dir}",
            f"  state        {self.state_dir / STATE_FILE}",
            f"  head pid     {self.launcher_pid} (+{max(len(self.pids) - 1, 0)} processes)",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# State dir: the record, its files, its lock


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def load_cluster(state_dir: str | Path | None = None) -> ClusterInfo | None:
    """The cluster recorded in `state_dir`, running or not; None when there is no state file."""
    path = state_path(resolve_state_dir(state_dir))
    try:
        return ClusterInfo.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(f"{path} is not a mimflow cluster state file ({e}); remove it by hand") from e


def write_state(info: ClusterInfo) -> None:
    path = state_path(info.state_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def resolve_state_dir(state_dir: str | Path | None) -> Path:
    return Path(state_dir).expanduser().absolute() if state_dir is not None else DEFAULT_STATE_DIR


def cleanup_files(info: ClusterInfo, keep_temp: bool) -> None:
    for path in (state_path(info.state_dir), info.token_path):
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if info.temp_dir_owned and not keep_temp:
        shutil.rmtree(info.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def flock(path: Path, timeout: float, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise ClusterBusyError(f"{what} is locked by another process ({path})") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def shell_env(info: ClusterInfo) -> str:
    """`export` lines for a POSIX shell; RAY_API_SERVER_ADDRESS (not RAY_ADDRESS) so that a local
    `mimflow` run in the same shell still starts its embedded Ray instead of dialling an http:// URL."""
    env = {"RAY_API_SERVER_ADDRESS": info.dashboard_url, "RAY_AUTH_MODE": info.auth_mode}
    if info.token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(info.token_path)
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("unset RAY_AUTH_TOKEN")
    if info.token_path is None:
        lines.append("unset RAY_AUTH_TOKEN_PATH")
    return "\n".join(lines)
