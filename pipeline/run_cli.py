"""``mimflow run`` and ``mimflow demo``."""

from __future__ import annotations

from pipeline.cli import not_built


def register(sub) -> None:
    p = sub.add_parser("run", help="every stage in order, skipping those already current")
    p.set_defaults(handler=not_built("run", "issue #7"))
    p = sub.add_parser("demo", help="the whole pipeline on the built-in shapes data, embedded local Ray")
    p.set_defaults(handler=not_built("demo", "issue #7"))
