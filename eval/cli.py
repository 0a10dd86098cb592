"""``mimflow codebook`` and ``mimflow eval``."""

from __future__ import annotations

from pipeline.cli import not_built


def register(sub) -> None:
    from eval.codebook.cli import register_codebook

    register_codebook(sub)  # codebook (issue #6)
    from eval.eval_cli import register_eval

    register_eval(sub)  # eval (issue #7)
