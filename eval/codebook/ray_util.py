"""Ray helpers of the report: a remote wrapper made at call time, and result gathering with progress."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


def remote(fn: Callable, **options):
    import ray

    return ray.remote(**options)(fn) if options else ray.remote(fn)


def gather(refs: list, on_result: Callable[[int, Any], None], what: str, quiet: bool) -> None:
    """Consume task results as they finish (bounded driver memory), with a progress line."""
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    pending, done, last = list(refs), 0, time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            on_result(index[ref], ray.get(ref))
            done += 1
        if not quiet and (time.monotonic() - last > 5 or not pending) and len(refs) > 1:
            print(f"  {what}: {done}/{len(refs)} shards", file=sys.stderr)
            last = time.monotonic()
