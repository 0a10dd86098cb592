"""Worker nodes for a local loopback head: separate Ray node processes on this machine, each with its own
ports, temp dir, tag and a custom resource naming it, so tests can place work on a node and lose a node.

    head = start_cluster(1, state_dir)
    with start_worker_node(head, "node_b", num_cpus=2) as node:
        ...                     # tasks with resources={"node_b": 1} run there
        node.kill()             # SIGKILL exactly that node's processes (a lost machine)

Why it looks like this (Ray 2.60 on Linux):

* **Same loopback settings as the head.** ``--node-ip-address 127.0.0.1`` plus
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keep every listener on 127.0.0.1; several raylets share the IP
  and differ by port, which Ray supports (its own multi-node test clusters do the same). In that mode
  ``ray start --address`` refuses to start a worker node, so it runs through ``infra/ray_node_start.py``,
  which lifts only that refusal.
* **Its own ports and temp dir.** All the ports a non-head node opens (node manager, object manager,
  metrics, dashboard agent, runtime-env agent, a worker-port block) are picked free under the head's port
  lock. The temp dir only holds this node's logs and sockets; the session name comes from the head.
* **The head's auth token.** The node joins with ``RAY_AUTH_MODE=token`` and the head's token path;
  without it the GCS refuses the node.
* **Its own tag.** ``infra.cluster_procs`` finds a cluster's processes by a tag in their environment;
  a node carries its *own* tag, so its raylet, workers and agents are found (and killed) without
  touching the head's. The head's stop does not see a node: stop nodes first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from infra.cluster_ports import PORT_FLAGS, pick_ports, ports_lock
from infra.cluster_procs import CHILDREN, TAG_ENV, Proc, _scan, launch_logged, pid_alive, read_stat
from infra.cluster_state import LOOPBACK, ClusterError, ClusterInfo, flock

# The raylet waits 15 s (Ray's default) for its dashboard agent to write its port file and aborts
# otherwise; on a loaded 2-core machine the agent's imports alone take longer. (`ray start` itself
# still gives the node 30 s to register, hard-coded.)
START_WAIT_ENV = {"RAY_raylet_start_wait_time_s": "60"}

# ports a non-head node opens (the GCS, dashboard and client server live on the head only)
NODE_PORT_FLAGS = {k: v for k, v in PORT_FLAGS.items() if k not in ("gcs", "dashboard", "ray_client_server")}


@dataclasses.dataclass
class WorkerNode:
    """A Ray node started by `start_worker_node`; a context manager that stops it on exit."""

    name: str  # also the custom resource the node offers ({name: 1})
    head_address: str
    num_cpus: int
    temp_dir: Path
    tag: str
    launcher_pid: int  # `ray start --block` (a new session)
    launcher_start: int
    node_id: str  # Ray's hex node id, once registered
    log_path: Path

    def processes(self) -> dict[int, Proc]:
        """This node's live processes (its `ray start`, raylet, agents, workers), none of the head's."""
        return _scan(self.tag, None, self.launcher_pid, self.launcher_start)

    def is_running(self) -> bool:
        return bool(self.processes())

    def kill(self, timeout: float = 15.0) -> list[int]:
        """SIGKILL every process of this node at once (a machine that vanished); returns the PIDs."""
        procs = self.processes()
        for pid, p in procs.items():
            if pid_alive(pid, p.start):  # re-check identity right before signalling
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._wait_gone(timeout)
        self._reap()
        return sorted(procs)

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Orderly: SIGTERM to `ray start --block`, then TERM/KILL whatever of this node is left.
        Removes the node's temp dir. Raises ClusterError naming any survivor."""
        seen = set(self.processes())
        if pid_alive(self.launcher_pid, self.launcher_start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.launcher_pid, signal.SIGTERM)
        left = self._wait_gone(timeout * 0.6)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, p in left.items():
                if pid_alive(pid, p.start):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            left = self._wait_gone(max(timeout * 0.2, 3.0))
        self._reap()
        if left:
            desc = ", ".join(f"{pid} ({p.cmdline[:60]})" for pid, p in left.items())
            raise ClusterError(f"could not stop worker node {self.name}: {desc}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return sorted(seen)

    def _wait_gone(self, timeout: float) -> dict[int, Proc]:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            left = self.processes()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.25)

    def _reap(self) -> None:
        child = CHILDREN.get(self.launcher_pid)
        if child is not None and child.poll() is not None:
            CHILDREN.pop(self.launcher_pid, None)

    def __enter__(self) -> "WorkerNode":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def alive_nodes(head: ClusterInfo) -> list[dict]:
    """The head's alive nodes from its state API (`/api/v0/nodes`): node_id, resources_total, ... .
    Plain HTTP: this process may already hold another Ray session, and a driver is not needed."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(head.dashboard_url + "/api/v0/nodes?limit=100", headers=head.auth_headers())
    with opener.open(req, timeout=30) as r:
        rows = json.loads(r.read())["data"]["result"]["result"]
    return [n for n in rows if n.get("state") == "ALIVE"]


def _registered_node_id(head: ClusterInfo, name: str) -> str | None:
    """The id of the alive node offering resource `name` (None while it has not joined)."""
    try:
        ids = [n["node_id"] for n in alive_nodes(head) if name in (n.get("resources_total") or {})]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None
    return ids[0] if len(ids) == 1 else None


def start_worker_node(head: ClusterInfo, name: str, num_cpus: int = 1, *, object_store_memory: int | None = None,
                      extra_env: dict[str, str] | None = None, timeout: float = 120.0,
                      attempts: int = 3) -> WorkerNode:
    """Start a Ray node joining `head` (a local cluster from `infra.local_cluster.start_cluster`), offering
    `num_cpus` CPUs and the custom resource `{name: 1}`; returns once the head lists it alive.
    `ray start` gives its dashboard agent a fixed 15 s to come up and exits otherwise, which happens on a
    loaded machine: such a start is retried (fresh ports, fresh temp dir) up to `attempts` times.
    Raises ClusterError (with the tail of its log) when it does not join."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_worker_node(head, name, num_cpus, object_store_memory, extra_env, timeout)
        except _StartExited as e:
            if attempt == attempts:
                raise ClusterError(str(e)) from None
    raise AssertionError("unreachable")


class _StartExited(ClusterError):
    """`ray start` exited before the node joined (retryable)."""


def _start_worker_node(head: ClusterInfo, name: str, num_cpus: int, object_store_memory: int | None,
                       extra_env: dict[str, str] | None, timeout: float) -> WorkerNode:
    if not name.isidentifier():
        raise ValueError(f"node name must be an identifier (it is a Ray resource name), not {name!r}")
    temp_dir = Path(tempfile.mkdtemp(prefix=f"mf-{name[:8]}-", dir="/tmp"))
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    env.update({
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        "RAY_AUTH_MODE": head.auth_mode,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 as the node IP, like the head
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_API_SERVER_ADDRESS": head.dashboard_url,  # Ray Train's state-API calls from this node
        **START_WAIT_ENV,
        TAG_ENV: tag,
    })
    if head.token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(head.token_path)
    env.update(extra_env or {})
    log_path = temp_dir / "ray-start.log"

    with flock(ports_lock(), timeout, "the local port allocator"):
        ports, (wlo, whi) = pick_ports(random.Random())
        cmd = [
            sys.executable, str(Path(__file__).with_name("ray_node_start.py")), "start", "--block",
            "--address", head.address,
            "--node-ip-address", LOOPBACK,
            "--num-cpus", str(num_cpus),
            "--resources", json.dumps({name: 1}),
            "--temp-dir", str(temp_dir),
            "--min-worker-port", str(wlo),
            "--max-worker-port", str(whi),
            "--disable-usage-stats",
            "--log-style", "record",
        ]
        for key, flag in NODE_PORT_FLAGS.items():
            cmd += [flag, str(ports[key])]
        if object_store_memory is not None:
            cmd += ["--object-store-memory", str(int(object_store_memory))]
        proc = launch_logged(cmd, env, temp_dir, log_path)
        st = read_stat(proc.pid)
        node = WorkerNode(name=name, head_address=head.address, num_cpus=num_cpus, temp_dir=temp_dir, tag=tag,
                          launcher_pid=proc.pid, launcher_start=st.start if st else 0, node_id="",
                          log_path=log_path)
        # hold the port lock until the raylet has bound its ports
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                node_id = _registered_node_id(head, name)
                if node_id:
                    node.node_id = node_id
                    return node
                time.sleep(1.0)
        except BaseException:
            with contextlib.suppress(ClusterError):
                node.stop(timeout=20.0)
            raise
    why = (f"`ray start` exited with code {proc.returncode}" if proc.poll() is not None
           else f"the head did not list it within {timeout:.0f}s")
    try:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
    except OSError:
        tail = "(no log)"
    with contextlib.suppress(ClusterError):
        node.stop(timeout=20.0)
    err = _StartExited if proc.poll() is not None else ClusterError
    raise err(f"worker node {name} failed to join {head.address}: {why}. Last lines of its log:\n{tail}")
