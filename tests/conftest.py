"""Shared fixtures: one in-process Ray for the whole session, small generated data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

# Two cores here: keep each test's torch single-threaded so Ray workers don't fight over them.
torch.set_num_threads(1)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray on 127.0.0.1 only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3-compatible test server's address is fixed before any Ray starts, so that every Ray worker
# (which inherits the environment of the Ray that spawned it) reaches the same server.
S3_PORT = _free_loopback_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="mimflow-test",
                  AWS_SECRET_ACCESS_KEY="mimflow-test", AWS_REGION="us-east-1")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (in-process head) with the machine's CPUs, shared by every test that asks for it."""
    import ray

    from pipeline.ray_context import start_local_ray

    if not ray.is_initialized():
        start_local_ray(max(2, os.cpu_count() or 2), log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def shapes_spec() -> str:
    return "shapes?n=48&size=32&seed=7&partition_size=16"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on loopback; yields a bucket factory."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on 127.0.0.1:{S3_PORT}")
            time.sleep(0.1)

    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def bucket(name: str) -> str:
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    yield bucket
    proc.terminate()
    proc.wait(timeout=10)


def pytest_collection_modifyitems(items):
    """The config-check tests assert that a bad config stops a command before any Ray starts, which they
    can only tell while no other test's Ray is up in this process: run them first (order otherwise kept)."""
    items.sort(key=lambda item: 0 if item.module.__name__ == "test_config_checks" else 1)
