"""The one way a stage gets Ray: an embedded local Ray by default, or a cluster.

``--address`` or ``RAY_ADDRESS`` (set by ``ray job submit`` for the job's driver) selects a cluster;
otherwise a local Ray is started in-process with this machine's CPUs, bound to loopback. A stage
wraps its work in ``with ray_session(address):`` and never asks which one it got.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator


def add_ray_arguments(parser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else start an embedded local Ray)",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray (default: all)"
    )


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray 2.60 on Linux swaps a loopback node IP for the routable one unless told it runs on a
        # single machine; read when ray is first imported, this keeps the embedded Ray on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():  # a caller (a test, `mimflow run`) already holds one: share it
        yield
        return
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address:
        ray.init(address=address, **common)
    else:
        # The dashboard stays on (bound to 127.0.0.1): Ray Train V2 polls the state API it serves.
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            _node_ip_address="127.0.0.1",
            dashboard_host="127.0.0.1",
            **common,
        )
    try:
        yield
    finally:
        ray.shutdown()


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
