"""What every entry point shares: the config arguments and one way to turn errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from pipeline.errors import USER_ERRORS


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
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (validated, absolute paths) as YAML and exit without starting Ray",
    )


def print_config(args: argparse.Namespace, cfg: Any) -> bool:
    """With ``--print-config``: print ``cfg`` as YAML and return True (the command then exits, having
    started nothing); otherwise False."""
    if not getattr(args, "print_config", False):
        return False
    from pipeline.config import dump_config

    print(dump_config(cfg), end="", flush=True)
    return True


def run_command(prog: str, command: Callable[[], int | None], interrupted: str = "finished work is kept, rerun to resume") -> int:
    """Run a command; errors a user can act on become one line on stderr and exit code 2."""
    try:
        return int(command() or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
