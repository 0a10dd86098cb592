"""Progress of long partitioned work on the driver: a line every ``every`` finished partitions and/or
every ``every_s`` seconds, and one at the end.

A line says partitions done/total, items done and the elapsed time, the rate, and the ETA of the
items left at that rate, e.g.::

    eval: features 20/80 partitions, 10240 images in 0:00:51, 200.8 images/s, ETA 0:02:33
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts finished partitions and prints when one of its cadences is due; ``finish`` prints the last line."""

    def __init__(self, label: str, total: int, todo_items: int, *, done: int = 0, every: int | None = 10,
                 every_s: float | None = None, unit: str = "images", parts: str = "partitions",
                 stream: TextIO | None = None):
        self.label, self.total, self.done, self.unit, self.parts = label, total, done, unit, parts
        self.every = max(1, int(every)) if every else None
        self.every_s = every_s
        self.items = 0  # items processed since start (the rate's numerator)
        self.left = todo_items
        self.finished_here = 0
        self.printed_at: int | None = None  # finished_here when the last line was printed
        self.stream = stream or sys.stderr
        self.t0 = self.last_print = time.perf_counter()

    def restart_clock(self) -> None:
        """Rates from now on (e.g. once workers are up, so start-up does not colour the ETA)."""
        self.t0 = self.last_print = time.perf_counter()

    def update(self, items: int, planned: int) -> None:
        """A partition finished: ``items`` processed of the ``planned`` it was counted as."""
        self.done += 1
        self.finished_here += 1
        self.items += items
        self.left -= planned
        if (self.every and self.finished_here % self.every == 0) or self._time_due():
            self.print()

    def tick(self) -> None:
        """Called while waiting: prints when the time cadence is due, so a slow partition still shows life."""
        if self._time_due():
            self.print()

    def _time_due(self) -> bool:
        return self.every_s is not None and time.perf_counter() - self.last_print >= self.every_s

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.items / elapsed
        eta = "0:00:00" if self.left <= 0 else (hms(self.left / rate) if rate > 0 else "?")
        return (f"{self.label} {self.done}/{self.total} {self.parts}, {self.items} {self.unit} in {hms(elapsed)}, "
                f"{rate:.1f} {self.unit}/s, ETA {eta}")

    def print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_print, self.printed_at = time.perf_counter(), self.finished_here

    def finish(self) -> None:
        if self.printed_at != self.finished_here:  # the last line, unless it was just printed
            self.print()
