"""``python -m eval --config RECIPE [--set k=v ...]``: the ``ray job submit`` entry point of ``mimflow eval``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.command import run_command

    from eval.eval_cli import DESCRIPTION, add_eval_arguments, handle_eval

    parser = argparse.ArgumentParser(
        prog="python -m eval", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("python -m eval", lambda: handle_eval(args))


if __name__ == "__main__":
    sys.exit(main())
