"""Ports for a local Ray head: every one picked free on 127.0.0.1, outside the kernel's ephemeral range
and Ray's defaults, and checked to be listening (loopback only) once the head is up."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path

from infra.cluster_state import LOOPBACK, ClusterError

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
PORT_FLAGS = {
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
LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def ephemeral_range() -> tuple[int, int]:
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


def pick_ports(rng: random.Random) -> tuple[dict[str, int], tuple[int, int]]:
    """Free ports for one head, all outside the ephemeral range and Ray's defaults (6379, 8265,
    10001, workers 10002-19999): 20000..ephemeral-low, or above the ephemeral range if that is tiny."""
    eph_lo, eph_hi = ephemeral_range()
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


def ports_lock() -> Path:
    """Machine-wide (per user) lock held from picking the ports until the head binds them."""
    return Path(tempfile.gettempdir()) / f"mimflow-ray-ports-{os.getuid()}.lock"


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


def all_ports_listening(ports: dict[str, int]) -> bool:
    for port in ports.values():
        addrs = listening_addresses(port)
        if addrs is None:
            return True  # cannot tell: rely on the job API check alone
        if not addrs:
            return False
    return True
