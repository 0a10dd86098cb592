"""``mimflow pretrain`` and ``mimflow export``."""

from __future__ import annotations

from pipeline.cli import not_built


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="masked image modeling pretraining (Ray Train DDP)")
    p.set_defaults(handler=not_built("pretrain", "issue #5"))
    p = sub.add_parser("export", help="export a pretrained encoder for timm")
    p.set_defaults(handler=not_built("export", "issue #5"))
