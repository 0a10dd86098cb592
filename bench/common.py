"""What every benchmark shares: the machine description and the one-JSON-line output."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any, Callable


def machine() -> dict[str, Any]:
    import faiss
    import numpy
    import ray
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "ray": ray.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
    }
    return info


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """Print one JSON line: the figure, its reference, their ratio, the sizes and the machine."""
    record = {**record, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(record), flush=True)
    return record


def size_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu", help="problem size (default: cpu)")
    return parser


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs, in seconds (best-of resists this machine's noise)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    json.dump(machine(), sys.stdout, indent=2)
