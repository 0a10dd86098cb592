"""A private, loopback-only Ray head for a laptop or a test: start it, submit jobs to it, stop exactly it.

    python -m infra.local_cluster start [--num-cpus 2] [--state-dir DIR] [--temp-dir DIR] [--no-auth]
    eval "$(python -m infra.local_cluster env)"      # then: ray job submit --working-dir . -- ...
    python -m infra.local_cluster status
    python -m infra.local_cluster stop

or from Python (tests)::

    with start_cluster(num_cpus=2, state_dir=tmp_path / "cluster") as cluster:
        subprocess.run([...ray job submit...], env=cluster.client_env())

What it does, and why:

* **Loopback only.** ``ray start --node-ip-address 127.0.0.1`` alone is not enough on Linux with Ray 2.60:
  Ray "resolves" a loopback node IP to the machine's routable address and its gRPC servers listen on
  every interface. Setting ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the head's environment makes Ray
  keep 127.0.0.1 as the node IP (the single-node mode Ray uses on laptops), so GCS, raylet, object
  manager, agents, client server and dashboard all listen on 127.0.0.1 only, and no other machine can
  join or reach it.
* **Token authentication stays on.** Ray 2.60 turns token auth on at ``ray start`` whenever a token is
  around (e.g. ``~/.ray/auth_token``), and the job CLI then fails with 401 unless the client runs with
  ``RAY_AUTH_MODE=token``. Instead of disabling it, every cluster gets its *own* random token, written
  to ``<state-dir>/auth_token`` (mode 0600) and handed to the head through ``RAY_AUTH_TOKEN_PATH``.
  Loopback keeps other machines out; the token keeps other local users (this is a shared machine) out
  of the dashboard and job API, which would otherwise run arbitrary code as us. ``env`` / ``client_env()``
  give a client ``RAY_AUTH_MODE=token`` and the token path. ``--no-auth`` starts the head with
  ``RAY_AUTH_MODE=disabled`` instead, for the case where the job CLI cannot be given the env.
* **Own temp dir and ports.** Every port Ray opens (GCS, dashboard, client server, node manager, object
  manager, metrics export, dashboard agent HTTP+gRPC, runtime-env agent, a block of worker ports) is
  picked free at start, below the kernel's ephemeral range and away from Ray's defaults, under a
  machine-wide lock, so concurrent test heads never collide with each other or with a default
  ``ray start``.
* **Stops what it started, nothing else.** ``ray start --block`` runs in a new session; its pid, the
  session id, the temp dir and a unique tag put in the head's environment (inherited by every Ray
  process, including job drivers that Ray puts in their own sessions) identify the cluster's
  processes. ``stop`` asks ``ray start`` to shut down (SIGTERM), then TERM/KILLs whatever of *those*
  processes is left. Never ``ray stop``, never by name. PIDs are checked against their start time so a
  recycled PID is never signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

DEFAULT_STATE_DIR = Path(os.environ.get("MIMFLOW_CLUSTER_DIR", "~/.mimflow/cluster")).expanduser()
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
LOG_FILE = "ray-start.log"
TAG_ENV = "MIMFLOW_RAY_CLUSTER"  # put in the head's env, inherited by every process of the cluster

# Ray names its unix sockets <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store; sun_path
# holds 107 bytes, so the temp dir must stay short (pytest's tmp_path usually does not).
MAX_TEMP_DIR_LEN = 40
WORKER_PORTS = 200  # one per worker process (and driver); Ray Train + Ray Data jobs stay far below
SINGLE_PORTS = (
    "gcs",
    "dashboard",
    "ray_client_server",
    "node_manager",
    "object_manager",
    "metrics_export",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "runtime_env_agent",
)
_PORT_FLAGS = {
    "gcs": "--port",
    "dashboard": "--dashboard-port",
    "ray_client_server": "--ray-client-server-port",
    "node_manager": "--node-manager-port",
    "object_manager": "--object-manager-port",
    "metrics_export": "--metrics-export-port",
    "dashboard_agent_listen": "--dashboard-agent-listen-port",
    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
    "runtime_env_agent": "--runtime-env-agent-port",
}
LOOPBACK = "127.0.0.1"

# Popen handles of heads started by this process, so that stop() can reap them (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


class ClusterError(RuntimeError):
    """A local cluster could not be started, found or stopped; the message says what to do."""


class ClusterBusyError(ClusterError):
    """The state dir (or temp dir) already belongs to a running cluster."""


# --------------------------------------------------------------------------------------------------
# Cluster description


@dataclasses.dataclass
class ClusterInfo:
    """What `start_cluster` started. Also a context manager: leaving the block stops the cluster."""

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

    # -- lifecycle ---------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return bool(cluster_processes(self))

    def stop(self, *, keep_temp: bool = False, timeout: float = 30.0) -> list[int]:
        """Stop this cluster (a no-op if it was already stopped, e.g. from another process). Never
        touches a newer cluster recorded in the same state dir."""
        current = load_cluster(self.state_dir)
        if current is not None and current.tag == self.tag:
            pids = stop_cluster(self.state_dir, keep_temp=keep_temp, timeout=timeout)
        else:  # our record is gone (stopped elsewhere, or replaced): stop whatever of ours is left
            pids = _stop(self, timeout=timeout) if cluster_processes(self) else []
            if self.temp_dir_owned and not keep_temp:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
        child = _CHILDREN.pop(self.launcher_pid, None)  # stopped elsewhere: still reap our child
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=timeout)
        return pids

    def __enter__(self) -> "ClusterInfo":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

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


def _state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def load_cluster(state_dir: str | Path | None = None) -> ClusterInfo | None:
    """The cluster recorded in `state_dir`, running or not; None when there is no state file."""
    path = _state_path(_resolve_state_dir(state_dir))
    try:
        return ClusterInfo.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(f"{path} is not a mimflow cluster state file ({e}); remove it by hand") from e


def _write_state(info: ClusterInfo) -> None:
    path = _state_path(info.state_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _resolve_state_dir(state_dir: str | Path | None) -> Path:
    return Path(state_dir).expanduser().absolute() if state_dir is not None else DEFAULT_STATE_DIR


# --------------------------------------------------------------------------------------------------
# Processes: /proc, same user only


@dataclasses.dataclass
class _Proc:
    pid: int
    ppid: int
    sid: int
    start: int
    state: str
    cmdline: str


def _read_stat(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = ""
    return _Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), start=int(fields[19]),
                 state=fields[0], cmdline=cmd.strip())


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True when `pid` exists, is not a zombie and (if given) started at `start`."""
    p = _read_stat(pid)
    return p is not None and p.state not in ("Z", "X") and (start is None or p.start == start)


def _own_lineage() -> set[int]:
    """This process and its ancestors: never signalled, whatever they reference."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        p = _read_stat(pid)
        pid = p.ppid if p else 0
    return out


def _references(pid: int, needles: list[bytes], temp_dir: str, use_cwd: bool) -> bool:
    for part in ("environ", "cmdline"):
        try:
            data = Path(f"/proc/{pid}/{part}").read_bytes()
        except OSError:
            continue
        if any(n in data for n in needles):
            return True
    if not use_cwd:
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == temp_dir or cwd.startswith(temp_dir + os.sep)


def _scan(tag: str | None, temp_dir: str | None, sid: int | None, sid_start: int | None,
          use_cwd: bool = False) -> dict[int, _Proc]:
    """Live processes of one cluster: same session as its `ray start` (started no earlier), or carrying
    its tag in their environment, or naming its temp dir (cmdline, environ; cwd too if use_cwd: off when
    choosing what to kill, so a shell someone left in the logs dir is spared); plus descendants."""
    uid, mine = os.getuid(), _own_lineage()
    needles = [n.encode() for n in ([f"{TAG_ENV}={tag}"] if tag else []) + ([temp_dir] if temp_dir else [])]
    procs: dict[int, _Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        p = _read_stat(pid)
        if p is not None and p.state not in ("Z", "X") and pid not in mine:
            procs[pid] = p
    found: dict[int, _Proc] = {}
    for pid, p in procs.items():
        in_session = sid is not None and p.sid == sid and (sid_start is None or p.start >= sid_start)
        if in_session or (needles and _references(pid, needles, temp_dir or "\0", use_cwd)):
            found[pid] = p
    grew = True
    while grew:  # descendants (a job's subprocesses may scrub their env and leave the session)
        grew = False
        for pid, p in procs.items():
            if pid not in found and p.ppid in found:
                found[pid] = p
                grew = True
    return found


def cluster_processes(info: ClusterInfo) -> dict[int, _Proc]:
    """The cluster's live processes right now (pid -> process), including ones Ray spawned since start."""
    return _scan(info.tag, str(info.temp_dir), info.launcher_pid, info.launcher_start)


def processes_referencing(path: str | Path) -> list[int]:
    """PIDs of live processes of this user whose cmdline, environment or cwd names `path`."""
    return sorted(_scan(None, str(path), None, None, use_cwd=True))


def _signal_all(procs: dict[int, _Proc], sig: int) -> None:
    for pid, p in procs.items():
        if pid_alive(pid, p.start):  # re-check identity right before signalling
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)


def _wait_gone(info: ClusterInfo, timeout: float) -> dict[int, _Proc]:
    deadline = time.monotonic() + timeout
    while True:
        _reap(info.launcher_pid)
        left = cluster_processes(info)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------------
# Ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _pick_ports(rng: random.Random) -> tuple[dict[str, int], tuple[int, int]]:
    """Free ports for one head, all outside the ephemeral range and Ray's defaults (6379, 8265,
    10001, workers 10002-19999): 20000..ephemeral-low, or above the ephemeral range if that is tiny."""
    eph_lo, eph_hi = _ephemeral_range()
    pools = [(20000, eph_lo - 1)] if eph_lo - 20000 > 4 * WORKER_PORTS else []
    if eph_hi < 65000:
        pools.append((eph_hi + 1, 65535))
    if not pools:
        pools = [(20000, 65535)]
    for _ in range(200):
        lo, hi = rng.choice(pools)
        if hi - lo < WORKER_PORTS + len(SINGLE_PORTS) + 10:
            continue
        base = rng.randrange(lo, hi - WORKER_PORTS)
        block = range(base, base + WORKER_PORTS)
        if not all(_port_free(p) for p in block):
            continue
        singles: dict[str, int] = {}
        taken = set(block)
        for name in SINGLE_PORTS:
            for _ in range(200):
                p = rng.randrange(lo, hi)
                if p not in taken and _port_free(p):
                    singles[name] = p
                    taken.add(p)
                    break
        if len(singles) == len(SINGLE_PORTS):
            return singles, (base, base + WORKER_PORTS - 1)
    raise ClusterError("could not find free ports for a Ray head on 127.0.0.1")


@contextlib.contextmanager
def _flock(path: Path, timeout: float, what: str) -> Iterator[None]:
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


def _ports_lock() -> Path:
    return Path(tempfile.gettempdir()) / f"mimflow-ray-ports-{os.getuid()}.lock"


# --------------------------------------------------------------------------------------------------
# Start / stop / status


def _dashboard_ready(url: str, headers: dict[str, str]) -> bool:
    """The job API answers (the JobHead module loads a little after the dashboard itself)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url + "/api/jobs/", headers=headers)
    try:
        with opener.open(req, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def listening_addresses(port: int) -> set[str] | None:
    """Local addresses (kernel hex form) with a TCP LISTEN socket on `port`; None if /proc/net is unreadable."""
    out: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            addr, _, hexport = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hexport, 16) == port:
                out.add(addr)
    return out if readable else None


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _all_ports_listening(ports: dict[str, int]) -> bool:
    for port in ports.values():
        addrs = listening_addresses(port)
        if addrs is None:
            return True  # cannot tell: rely on the job API check alone
        if not addrs:
            return False
    return True


def _log_tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_cluster(
    num_cpus: int = 2,
    state_dir: str | Path | None = None,
    temp_dir: str | Path | None = None,
    *,
    num_gpus: int | None = None,
    auth: str = "token",
    object_store_memory: int | None = None,
    timeout: float = 120.0,
    drain_timeout_s: float = 0.0,
    extra_env: dict[str, str] | None = None,
) -> ClusterInfo:
    """Start a Ray head on 127.0.0.1 and wait until its job API answers.

    num_cpus: logical CPUs the head offers. state_dir: where cluster.json, the auth token and the
    `ray start` log go (default ~/.mimflow/cluster or $MIMFLOW_CLUSTER_DIR); one cluster per state dir.
    temp_dir: Ray's --temp-dir (default: a fresh /tmp/mimflow-ray-XXXX, removed at stop; a given one is
    kept). auth: "token" (a fresh per-cluster token) or "disabled". object_store_memory: bytes (Ray's
    default when None). drain_timeout_s: how long the head drains running tasks on SIGTERM before
    shutting down (Ray's default is 30 s; a local head has nobody to hand work to, so 0 = stop at once).
    extra_env: added to the head's environment (inherited by workers and jobs).

    Raises ClusterBusyError when the state dir already has a running cluster, ClusterError when the
    head does not come up (with the tail of its log).
    """
    if auth not in ("token", "disabled"):
        raise ValueError(f"auth must be 'token' or 'disabled', not {auth!r}")
    if num_cpus < 1:
        raise ValueError("num_cpus must be >= 1")
    state_dir = _resolve_state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    with _flock(state_dir / ".lock", 1.0, f"state dir {state_dir}"):
        old = load_cluster(state_dir)
        if old is not None:
            live = cluster_processes(old)
            if live:
                raise ClusterBusyError(
                    f"state dir {state_dir} already holds a running Ray cluster (dashboard "
                    f"{old.dashboard_url}, head pid {old.launcher_pid}, {len(live)} processes); stop it "
                    f"first: python -m infra.local_cluster stop --state-dir {shlex.quote(str(state_dir))}"
                )
            _cleanup_files(old, keep_temp=False)  # stale record: its processes are gone

        owned = temp_dir is None
        if owned:
            temp_dir = Path(tempfile.mkdtemp(prefix="mimflow-ray-", dir="/tmp"))
        else:
            temp_dir = Path(temp_dir).expanduser().absolute()
            if len(str(temp_dir)) > MAX_TEMP_DIR_LEN:
                raise ClusterError(
                    f"temp dir {temp_dir} is {len(str(temp_dir))} characters; Ray's unix socket paths "
                    f"under it must fit 107 bytes, so keep it <= {MAX_TEMP_DIR_LEN} (e.g. /tmp/mf-xyz) "
                    f"or leave it out to get a fresh short one"
                )
            busy = processes_referencing(temp_dir)
            if busy:
                raise ClusterBusyError(f"temp dir {temp_dir} is in use by processes {busy}")
            temp_dir.mkdir(parents=True, exist_ok=True)

        token_path: Path | None = None
        if auth == "token":
            token_path = state_dir / TOKEN_FILE
            with contextlib.suppress(FileNotFoundError):
                token_path.unlink()
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))

        tag = uuid.uuid4().hex
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(k, None)
        venv_bin = str(Path(sys.executable).parent)  # `python` in job entrypoints = this interpreter
        env.update({
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "RAY_AUTH_MODE": auth,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 as node IP: loopback-only binds
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(float(drain_timeout_s)),
            TAG_ENV: tag,
        })
        if token_path is not None:
            env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        env.update(extra_env or {})

        log_path = state_dir / LOG_FILE
        with _flock(_ports_lock(), timeout, "the local port allocator"):
            ports, (wlo, whi) = _pick_ports(random.Random())
            cmd = [
                sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                "--node-ip-address", LOOPBACK,
                "--dashboard-host", LOOPBACK,
                "--include-dashboard", "true",
                "--num-cpus", str(num_cpus),
                "--temp-dir", str(temp_dir),
                "--min-worker-port", str(wlo),
                "--max-worker-port", str(whi),
                "--disable-usage-stats",
                "--log-style", "record",
            ]
            for name, flag in _PORT_FLAGS.items():
                cmd += [flag, str(ports[name])]
            if num_gpus is not None:
                cmd += ["--num-gpus", str(num_gpus)]
            if object_store_memory is not None:
                cmd += ["--object-store-memory", str(int(object_store_memory))]

            with open(log_path, "wb") as log:
                log.write(("$ " + shlex.join(cmd) + "\n").encode())
                log.flush()
                proc = subprocess.Popen(cmd, env=env, cwd=str(temp_dir), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            _CHILDREN[proc.pid] = proc
            launcher = _read_stat(proc.pid)
            info = ClusterInfo(
                state_dir=state_dir, temp_dir=temp_dir, temp_dir_owned=owned,
                address=f"{LOOPBACK}:{ports['gcs']}", dashboard_url=f"http://{LOOPBACK}:{ports['dashboard']}",
                ports=ports, worker_ports=(wlo, whi), num_cpus=num_cpus, num_gpus=num_gpus,
                auth_mode=auth, token_path=token_path, tag=tag, launcher_pid=proc.pid,
                launcher_start=launcher.start if launcher else 0, pids={}, log_path=log_path,
                created=time.time(),
            )
            _write_state(info)  # written before waiting: a crash mid-start still leaves a stoppable record

            deadline = time.monotonic() + timeout
            headers = info.auth_headers()
            ready = False
            try:
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        break
                    # Up = the job API answers and every component listens (the dashboard agent and
                    # the runtime-env agent come up a little after the dashboard).
                    if _dashboard_ready(info.dashboard_url, headers) and _all_ports_listening(ports):
                        ready = True
                        break
                    time.sleep(0.5)
            except BaseException:  # interrupted while waiting: leave nothing running behind
                with contextlib.suppress(ClusterError):
                    _stop(info, timeout=20.0)
                _cleanup_files(info, keep_temp=False)
                raise
        if not ready:
            why = (f"`ray start` exited with code {proc.returncode}" if proc.poll() is not None
                   else f"the job API at {info.dashboard_url} did not answer within {timeout:.0f}s")
            try:
                _stop(info, timeout=20.0)
            except ClusterError as e:
                why += f" (and cleaning up failed: {e})"
            _cleanup_files(info, keep_temp=True)
            raise ClusterError(f"Ray head failed to start: {why}. Last lines of {log_path}:\n"
                               f"{_log_tail(log_path)}\n(Ray's own logs: {temp_dir}/session_latest/logs)")

        info.pids = {pid: p.start for pid, p in cluster_processes(info).items()}
        _write_state(info)
        return info


def _stop(info: ClusterInfo, timeout: float) -> list[int]:
    seen = cluster_processes(info)
    recorded = {pid: start for pid, start in info.pids.items() if pid_alive(pid, start)}
    all_pids = set(seen) | set(recorded)
    if pid_alive(info.launcher_pid, info.launcher_start):
        # Orderly: `ray start --block` shuts its children down on SIGTERM (a few seconds).
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.launcher_pid, signal.SIGTERM)
        left = _wait_gone(info, max(timeout * 0.6, 5.0))
    else:
        left = seen
    for pid, start in recorded.items():  # anything recorded at start that the scan no longer matches
        p = _read_stat(pid) if pid not in left and pid_alive(pid, start) else None
        if p is not None:
            left[pid] = p
    if left:
        _signal_all(left, signal.SIGTERM)
        deadline = time.monotonic() + max(timeout * 0.2, 3.0)
        while time.monotonic() < deadline and any(pid_alive(pid, p.start) for pid, p in left.items()):
            time.sleep(0.2)
        _signal_all(left, signal.SIGKILL)
        _wait_gone(info, max(timeout * 0.2, 3.0))
    child = _CHILDREN.pop(info.launcher_pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    survivors = dict(cluster_processes(info))
    survivors.update({pid: _read_stat(pid) for pid, start in info.pids.items() if pid_alive(pid, start)})
    if survivors:
        desc = ", ".join(f"{pid} ({(p.cmdline if p else '')[:60]})" for pid, p in survivors.items())
        raise ClusterError(f"could not stop cluster processes: {desc}")
    return sorted(all_pids)


def _cleanup_files(info: ClusterInfo, keep_temp: bool) -> None:
    for path in (_state_path(info.state_dir), info.token_path):
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if info.temp_dir_owned and not keep_temp:
        shutil.rmtree(info.temp_dir, ignore_errors=True)


def stop_cluster(state_dir: str | Path | None = None, *, keep_temp: bool = False, timeout: float = 30.0) -> list[int]:
    """Stop the cluster recorded in `state_dir`: exactly its processes, by PID. Returns the PIDs it had
    (empty when there was no cluster). Removes the state file and token, and the temp dir if this
    module created it (unless keep_temp: then Ray's logs stay in <temp_dir>/session_latest/logs)."""
    state_dir = _resolve_state_dir(state_dir)
    if not _state_path(state_dir).exists():
        return []
    with _flock(state_dir / ".lock", timeout, f"state dir {state_dir}"):
        info = load_cluster(state_dir)
        if info is None:
            return []
        pids = _stop(info, timeout=timeout)
        _cleanup_files(info, keep_temp=keep_temp)
        return pids


def cluster_status(state_dir: str | Path | None = None) -> dict:
    """{'state': 'running'|'stopped'|'absent', ...}: 'stopped' means a stale state file (processes gone)."""
    info = load_cluster(state_dir)
    if info is None:
        return {"state": "absent", "state_dir": str(_resolve_state_dir(state_dir))}
    live = cluster_processes(info)
    out = info.to_json()
    out.update({
        "state": "running" if live else "stopped",
        "live_pids": sorted(live),
        "job_api": _dashboard_ready(info.dashboard_url, info.auth_headers()) if live else False,
    })
    return out


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, state_dir: str | Path | None = None, **kwargs) -> Iterator[ClusterInfo]:
    """`with local_cluster(2, tmp) as c:` == `with start_cluster(2, tmp) as c:`."""
    info = start_cluster(num_cpus, state_dir, **kwargs)
    try:
        yield info
    finally:
        info.stop()


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


# --------------------------------------------------------------------------------------------------
# CLI


def _print_started(info: ClusterInfo) -> None:
    auth_env = (f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(str(info.token_path))} "
                if info.token_path else "RAY_AUTH_MODE=disabled ")
    sd = "" if info.state_dir == DEFAULT_STATE_DIR else f" --state-dir {shlex.quote(str(info.state_dir))}"
    print(info.summary())
    print()
    print("Submit jobs (job code runs from an uploaded copy: give absolute paths or URIs):")
    print(f'  eval "$(python -m infra.local_cluster env{sd})"')
    print('  ray job submit --working-dir . -- python -c "import ray; ray.init(); print(ray.cluster_resources())"')
    print("or, in one line:")
    print(f"  RAY_ADDRESS={info.dashboard_url} {auth_env}ray job submit --working-dir . -- python -m tokenizer ...")
    print(f"or: python -m infra.submit{sd} tokenizer -- ...")
    print(f"Stop it with: python -m infra.local_cluster stop{sd}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=None,
                        help=f"cluster record, token and log (default {DEFAULT_STATE_DIR}, or $MIMFLOW_CLUSTER_DIR)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", help="start a loopback Ray head and wait for its job API")
    p.add_argument("--num-cpus", type=int, default=min(os.cpu_count() or 1, 4))
    p.add_argument("--num-gpus", type=int, default=None, help="default: Ray autodetects")
    p.add_argument("--temp-dir", default=None, help=f"Ray's --temp-dir (<= {MAX_TEMP_DIR_LEN} chars; default fresh under /tmp)")
    p.add_argument("--object-store-memory", type=int, default=None, help="bytes (default: Ray's)")
    p.add_argument("--no-auth", action="store_true",
                   help="start with RAY_AUTH_MODE=disabled (loopback only; any local user could submit jobs)")
    p.add_argument("--timeout", type=float, default=120.0)
    p = sub.add_parser("stop", help="stop exactly the processes of the recorded cluster")
    p.add_argument("--keep-temp", action="store_true", help="keep Ray's temp dir (logs)")
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("status", help="is the recorded cluster running? (exit 0 yes, 1 no)")
    p.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print `export` lines for `ray job` in this shell")
    for name in ("start", "stop", "status", "env"):  # accept --state-dir after the subcommand too
        sub.choices[name].add_argument("--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            info = start_cluster(args.num_cpus, args.state_dir, args.temp_dir, num_gpus=args.num_gpus,
                                 auth="disabled" if args.no_auth else "token",
                                 object_store_memory=args.object_store_memory, timeout=args.timeout)
            _CHILDREN.clear()  # the head outlives this command on purpose
            _print_started(info)
            return 0
        if args.cmd == "stop":
            info = load_cluster(args.state_dir)
            pids = stop_cluster(args.state_dir, keep_temp=args.keep_temp, timeout=args.timeout)
            if info is None:
                print(f"no cluster recorded in {_resolve_state_dir(args.state_dir)}")
            else:
                print(f"stopped the Ray cluster at {info.dashboard_url} ({len(pids)} processes: "
                      f"{' '.join(map(str, pids))})")
            return 0
        if args.cmd == "status":
            st = cluster_status(args.state_dir)
            if args.json:
                print(json.dumps(st, indent=2, sort_keys=True))
            elif st["state"] == "absent":
                print(f"no cluster recorded in {st['state_dir']}")
            else:
                info = ClusterInfo.from_json({k: v for k, v in st.items()
                                              if k not in ("state", "live_pids", "job_api")})
                print(info.summary())
                print(f"  state        {st['state']} ({len(st['live_pids'])} live processes, job API "
                      f"{'answering' if st['job_api'] else 'not answering'})")
            return 0 if st["state"] == "running" else 1
        if args.cmd == "env":
            info = load_cluster(args.state_dir)
            if info is None or not info.is_running():
                print(f"no running cluster recorded in {_resolve_state_dir(args.state_dir)}; "
                      f"start one: python -m infra.local_cluster start", file=sys.stderr)
                return 1
            print(shell_env(info))
            return 0
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
