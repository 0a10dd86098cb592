"""``python -m pretrain --config RECIPE [--set key=value ...]``: the pretraining Ray job.

Submit it to any cluster (absolute or URI paths: the job runs from a copy of the working dir)::

    ray job submit --working-dir . -- python -m pretrain --config demo \\
        --set data.tokens=/abs/tokens/<tokenizer_id> --set data.tokenizer=/abs/tokenizer --set out=/abs/runs

or run it here with an embedded local Ray. Prints one JSON line with the checkpoint and encoder paths.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.command import run_command
    from pretrain.cli import add_pretrain_arguments, pretrain_command

    parser = argparse.ArgumentParser(prog="python -m pretrain", description="Masked image modeling pretraining on Ray Train.")
    add_pretrain_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(
        "python -m pretrain", lambda: pretrain_command(args),
        interrupted="rerun the same command to resume from the last checkpoint",
    )


if __name__ == "__main__":
    sys.exit(main())
