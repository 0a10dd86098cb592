"""``mimflow codebook`` and ``mimflow eval``."""

from __future__ import annotations

from pipeline.cli import not_built


def register(sub) -> None:
    p = sub.add_parser("codebook", help="codebook utilisation report (FAISS)")
    p.set_defaults(handler=not_built("codebook", "issue #6"))
    p = sub.add_parser("eval", help="kNN, linear probe and fine-tune evaluation")
    p.set_defaults(handler=not_built("eval", "issue #7"))
