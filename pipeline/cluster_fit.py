"""Before a stage asks Ray for work: does the cluster have room for it, and can its nodes share paths?

Ray itself would wait for an infeasible request forever (Ray Train loops on worker-group start-up
timeouts while the job stays RUNNING). On a Ray this process started nothing will add a node, so an
infeasible request is an error naming what is missing; on a cluster an autoscaler may add nodes, so
the stage warns and waits a bounded time.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from pipeline import storage
from pipeline.errors import ConfigError, StageError

WAIT_FOR_NODES_S = 600.0
SHARED_FS_ENV = "MIMFLOW_SHARED_FS"


@dataclass(frozen=True)
class WorkerRequest:
    """``workers`` bundles of ``cpus`` CPUs and ``gpus`` GPUs; each bundle must fit on one node."""

    workers: int
    cpus: float
    gpus: float = 0.0
    what: str = "Ray Train workers"

    def describe(self) -> str:
        gpus = f" + {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.workers} {self.what} x ({self.cpus:g} CPU{gpus})"


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def cpus_per_actor(cpus: float, actors: int) -> int:
    """Each of ``actors`` long-lived actors' share of ``cpus``, but never more than the biggest alive
    node has: an actor lives on one node, and a bigger request would wait forever."""
    node_cpus = max((float(r.get("CPU", 0)) for r in alive_nodes()), default=cpus)
    return max(1, int(min(cpus // actors, node_cpus)))


def workers_that_fit(req: WorkerRequest, nodes: Iterable[dict[str, float]]) -> int:
    """How many of the request's bundles the nodes hold at once (each bundle on a single node)."""
    total = 0
    for node in nodes:
        per_node = [math.floor(node.get("CPU", 0.0) / req.cpus + 1e-9)] if req.cpus else []
        if req.gpus:
            per_node.append(math.floor(node.get("GPU", 0.0) / req.gpus + 1e-9))
        total += min(per_node) if per_node else req.workers
    return total


def _nodes_summary(nodes: Sequence[dict[str, float]]) -> str:
    if not nodes:
        return "no alive node"
    parts = [f"{n.get('CPU', 0):g} CPU" + (f" + {n['GPU']:g} GPU" if n.get("GPU") else "") for n in nodes]
    return f"{len(nodes)} node(s): " + ", ".join(parts)


def check_request(req: WorkerRequest, *, can_grow: bool, log: Callable[[str], None] = print,
                  wait_s: float = WAIT_FOR_NODES_S, poll_s: float = 2.0) -> None:
    """Return once the cluster can hold the whole request; otherwise a one-line error.

    ``can_grow``: the cluster may gain nodes (an autoscaler); then wait up to ``wait_s`` first.
    """
    nodes = alive_nodes()
    if workers_that_fit(req, nodes) >= req.workers:
        return
    problem = (f"{req.describe()} do not fit on this Ray cluster ({_nodes_summary(nodes)}); "
               "ask for fewer workers or fewer CPUs/GPUs per worker, or add nodes")
    if not can_grow:
        raise ConfigError(problem)
    log(f"warning: {problem}; waiting up to {wait_s:.0f} s for the autoscaler to add nodes")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if workers_that_fit(req, alive_nodes()) >= req.workers:
            log("the cluster has room now: starting")
            return
    raise StageError(f"{problem} (waited {wait_s:.0f} s; nothing was added)")


def check_shared_paths(locations: Iterable[tuple[str, str | None]], *, shared_fs: bool | None = None) -> None:
    """On a cluster of more than one node, refuse local paths unless they are declared shared.

    ``locations``: (config field, path or URI) pairs. A local path on several nodes means each node
    reads and writes its own disk: a cache whose shards are split over the machines, checkpoints a
    restarted worker cannot find. ``shared_fs`` defaults to ``MIMFLOW_SHARED_FS=1`` in the environment
    (a fact about the cluster, like ``RAY_ADDRESS``).
    """
    if shared_fs is None:
        shared_fs = os.environ.get(SHARED_FS_ENV, "") not in ("", "0")
    local = [(name, loc) for name, loc in locations if loc and not storage.is_uri(loc)]
    if shared_fs or not local or len(alive_nodes()) <= 1:
        return
    named = ", ".join(f"{name}={loc}" for name, loc in local)
    raise ConfigError(f"{named}: a local path on a cluster of {len(alive_nodes())} nodes; use an s3:// or gs:// "
                      f"URI, or set {SHARED_FS_ENV}=1 if every node mounts this path (NFS, ...)")
