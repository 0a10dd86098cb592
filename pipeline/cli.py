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


def run_command(prog: str, command: Callable[[], int | None], interrupted: str = "finished work is kept, rerun to resume") -> int:
    """Run a command; errors a user can act on become one line on stderr and exit code 2."""
    from pipeline.config import ConfigError
    from pipeline.token_cache import CacheError
    from pipeline.sources import SourceError

    try:
        return int(command() or 0)
    except (StageError, ConfigError, SourceError, CacheError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"mimflow {args.command}", lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
