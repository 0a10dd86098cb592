"""Shared fixtures: one in-process Ray for the whole session, small generated data."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores here: keep each test's torch single-threaded so Ray workers don't fight over them.
torch.set_num_threads(1)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray on 127.0.0.1 only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (in-process head), shared by every test that asks for it."""
    import ray

    from pipeline.ray_context import start_local_ray

    if not ray.is_initialized():
        start_local_ray(4, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def shapes_spec() -> str:
    return "shapes?n=48&size=32&seed=7&partition_size=16"
