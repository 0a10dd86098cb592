"""A local cluster's processes: found through /proc (this user's only) and stopped by PID, each PID
re-checked against its start time right before a signal. Never ``ray stop``, never by name."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from infra.cluster_state import (ClusterError, ClusterInfo, cleanup_files, flock, load_cluster, resolve_state_dir,
                                 state_path)

TAG_ENV = "MIMFLOW_RAY_CLUSTER"  # put in the head's env, inherited by every process of the cluster

# Popen handles of heads started by this process, so that stop() can reap them (no zombies).
CHILDREN: dict[int, subprocess.Popen] = {}


@dataclasses.dataclass
class Proc:
    pid: int
    ppid: int
    sid: int
    start: int
    state: str
    cmdline: str


def launch_logged(cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start a Ray node launcher in its own session, its output (after the command line) in ``log_path``."""
    with open(log_path, "wb") as log:
        log.write(("$ " + shlex.join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    CHILDREN[proc.pid] = proc
    return proc


def read_stat(pid: int) -> Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = ""
    return Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), start=int(fields[19]),
                 state=fields[0], cmdline=cmd.strip())


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True when `pid` exists, is not a zombie and (if given) started at `start`."""
    p = read_stat(pid)
    return p is not None and p.state not in ("Z", "X") and (start is None or p.start == start)


def _own_lineage() -> set[int]:
    """This process and its ancestors: never signalled, whatever they reference."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        p = read_stat(pid)
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
          use_cwd: bool = False) -> dict[int, Proc]:
    """Live processes of one cluster: same session as its `ray start` (started no earlier), or carrying
    its tag in their environment, or naming its temp dir (cmdline, environ; cwd too if use_cwd: off when
    choosing what to kill, so a shell someone left in the logs dir is spared); plus descendants."""
    uid, mine = os.getuid(), _own_lineage()
    needles = [n.encode() for n in ([f"{TAG_ENV}={tag}"] if tag else []) + ([temp_dir] if temp_dir else [])]
    procs: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        p = read_stat(pid)
        if p is not None and p.state not in ("Z", "X") and pid not in mine:
            procs[pid] = p
    found: dict[int, Proc] = {}
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


def cluster_processes(info: ClusterInfo) -> dict[int, Proc]:
    """The cluster's live processes right now (pid -> process), including ones Ray spawned since start."""
    return _scan(info.tag, str(info.temp_dir), info.launcher_pid, info.launcher_start)


def processes_referencing(path: str | Path) -> list[int]:
    """PIDs of live processes of this user whose cmdline, environment or cwd names `path`."""
    return sorted(_scan(None, str(path), None, None, use_cwd=True))


def _signal_all(procs: dict[int, Proc], sig: int) -> None:
    for pid, p in procs.items():
        if pid_alive(pid, p.start):  # re-check identity right before signalling
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _reap(pid: int) -> None:
    child = CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        CHILDREN.pop(pid, None)


def _wait_gone(info: ClusterInfo, timeout: float) -> dict[int, Proc]:
    deadline = time.monotonic() + timeout
    while True:
        _reap(info.launcher_pid)
        left = cluster_processes(info)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.25)


def stop_processes(info: ClusterInfo, timeout: float) -> list[int]:
    """SIGTERM to `ray start --block`, then TERM/KILL whatever of the cluster's processes is left.
    Returns every PID the cluster had; raises ClusterError naming any survivor."""
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
        p = read_stat(pid) if pid not in left and pid_alive(pid, start) else None
        if p is not None:
            left[pid] = p
    if left:
        _signal_all(left, signal.SIGTERM)
        deadline = time.monotonic() + max(timeout * 0.2, 3.0)
        while time.monotonic() < deadline and any(pid_alive(pid, p.start) for pid, p in left.items()):
            time.sleep(0.2)
        _signal_all(left, signal.SIGKILL)
        _wait_gone(info, max(timeout * 0.2, 3.0))
    child = CHILDREN.pop(info.launcher_pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    survivors = dict(cluster_processes(info))
    survivors.update({pid: read_stat(pid) for pid, start in info.pids.items() if pid_alive(pid, start)})
    if survivors:
        desc = ", ".join(f"{pid} ({(p.cmdline if p else '')[:60]})" for pid, p in survivors.items())
        raise ClusterError(f"could not stop cluster processes: {desc}")
    return sorted(all_pids)


def stop_cluster(state_dir: str | Path | None = None, *, keep_temp: bool = False, timeout: float = 30.0) -> list[int]:
    """Stop the cluster recorded in `state_dir`: exactly its processes, by PID. Returns the PIDs it had
    (empty when there was no cluster). Removes the state file and token, and the temp dir if
    `start_cluster` created it (unless keep_temp: then Ray's logs stay in <temp_dir>/session_latest/logs)."""
    state_dir = resolve_state_dir(state_dir)
    if not state_path(state_dir).exists():
        return []
    with flock(state_dir / ".lock", timeout, f"state dir {state_dir}"):
        info = load_cluster(state_dir)
        if info is None:
            return []
        pids = stop_processes(info, timeout=timeout)
        cleanup_files(info, keep_temp=keep_temp)
        return pids


def cluster_running(info: ClusterInfo) -> bool:
    """Whether any process of this cluster is alive (found in /proc by its tag, temp dir and session)."""
    return bool(cluster_processes(info))


def stop_this_cluster(info: ClusterInfo, *, keep_temp: bool = False, timeout: float = 30.0) -> list[int]:
    """Stop this cluster (a no-op if it was already stopped, e.g. from another process). Never touches a
    newer cluster recorded in the same state dir."""
    current = load_cluster(info.state_dir)
    if current is not None and current.tag == info.tag:
        pids = stop_cluster(info.state_dir, keep_temp=keep_temp, timeout=timeout)
    else:  # our record is gone (stopped elsewhere, or replaced): stop whatever of ours is left
        pids = stop_processes(info, timeout=timeout) if cluster_processes(info) else []
        if info.temp_dir_owned and not keep_temp:
            shutil.rmtree(info.temp_dir, ignore_errors=True)
    child = CHILDREN.pop(info.launcher_pid, None)  # stopped elsewhere: still reap our child
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=timeout)
    return pids


@dataclasses.dataclass
class Cluster(ClusterInfo):
    """A cluster `start_cluster` started: its record plus its lifecycle. A context manager: leaving the
    block stops the cluster."""

    def is_running(self) -> bool:
        return cluster_running(self)

    def stop(self, *, keep_temp: bool = False, timeout: float = 30.0) -> list[int]:
        return stop_this_cluster(self, keep_temp=keep_temp, timeout=timeout)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
