"""A Ray worker setup hook for kill tests: each cache partition takes a while, so a kill lands mid-build.

Passed as ``runtime_env={"worker_process_setup_hook": "slow_partitions.install"}`` by a test's own
driver; it slows the actors of that job only, and keeps the pause out of the builder's API.
"""

from __future__ import annotations

import os
import time

DELAY_ENV = "MIMFLOW_TEST_PARTITION_DELAY_S"


def install() -> None:
    from tokenizer.cache_worker import PartitionEncoder

    delay = float(os.environ.get(DELAY_ENV, "0.3"))
    encode_items = PartitionEncoder.encode_items

    def slow_encode_items(self, items):
        out = encode_items(self, items)
        time.sleep(delay)
        return out

    PartitionEncoder.encode_items = slow_encode_items


def driver_code(address: str, tests_dir: str, delay_s: float, build_call: str) -> str:
    """Python source for a subprocess driver that runs ``build_call`` with slowed cache actors."""
    runtime_env = {
        "worker_process_setup_hook": "slow_partitions.install",
        "env_vars": {"PYTHONPATH": os.pathsep.join([os.path.dirname(tests_dir), tests_dir]), DELAY_ENV: str(delay_s)},
    }
    return (
        "import ray; from tokenizer.precompute import build_cache; "
        f"ray.init(address={address!r}, runtime_env={runtime_env!r}); "
        f"{build_call}"
    )
