"""``mimflow``: one subcommand group per stage. Each stage package owns its commands in ``<pkg>/cli.py``.

Heavy imports (torch, ray) happen inside the command handlers so that ``mimflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eval import cli as eval_cli
from mimflow import data_cli, run_cli
from pipeline.command import run_command
from pretrain import cli as pretrain_cli
from tokenizer import cli as tokenizer_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimflow",
        description="BEiT-style masked image modeling with an offline visual-token cache, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_cli.register(sub)  # data
    tokenizer_cli.register(sub)  # tokenizer, tokens
    pretrain_cli.register(sub)  # pretrain, export
    eval_cli.register(sub)  # codebook, eval
    run_cli.register(sub)  # run, demo
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"mimflow {args.command}", lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
