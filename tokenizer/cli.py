"""``mimflow tokenizer ...`` and ``mimflow tokens ...``."""

from __future__ import annotations

from pipeline.cli import not_built


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a visual tokenizer (dVAE or VQ-KD)")
    p.set_defaults(handler=not_built("tokenizer", "issue #3"))
    p = sub.add_parser("tokens", help="build, refresh, verify and show the offline token cache")
    p.set_defaults(handler=not_built("tokens", "issue #4"))
