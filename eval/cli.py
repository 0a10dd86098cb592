"""``mimflow codebook`` and ``mimflow eval``."""

from __future__ import annotations


def register(sub) -> None:
    from eval.codebook.cli import register_codebook
    from eval.eval_cli import register_eval

    register_codebook(sub)
    register_eval(sub)
