"""Codebook utilisation reports: how a visual tokenizer's codes are used, seen through its token cache.

``codebook_report(cache_dir, out_dir, tokenizer_dir=None, ...)`` is the API; ``mimflow codebook report``
the command (``eval.codebook.cli``).
"""

from __future__ import annotations


def codebook_report(*args, **kwargs):
    from eval.codebook.report import codebook_report as run

    return run(*args, **kwargs)


__all__ = ["codebook_report"]
