"""``mimflow``: one subcommand group per stage. Each stage package owns its commands in ``<pkg>/cli.py``.

Heavy imports (torch, ray) happen inside the command handlers so that ``mimflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class StageError(Exception):
    """An error a user can act on: printed as one line, exit code 2, no traceback."""


def add_config_arguments(parser: argparse.ArgumentParser, stage: str, default: str | None = "demo") -> None:
    parser.add_argument(
        "--config",
        default=default,
        help=f"packaged {stage} recipe name or a YAML path (default: {default})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)",
    )


def not_built(stage: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        print(f"mimflow {stage}: this stage is not built yet ({issue}).", file=sys.stderr)
        return 3

    return handler


def build_parser() -> argparse.ArgumentParser:
    from eval import cli as eval_cli
    from pipeline import data_cli, run_cli
    from pretrain import cli as pretrain_cli
    from tokenizer import cli as tokenizer_cli

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
    from pipeline.config import ConfigError
    from pipeline.sources import SourceError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (StageError, ConfigError, SourceError, FileNotFoundError) as e:
        print(f"mimflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimflow {args.command}: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
