"""``python -m tokenizer --config RECIPE [--set key=value ...]``: the stage-1 Ray job.

Trains the tokenizer if no current checkpoint exists, then builds (or resumes) its token cache.
Submit it to any cluster::

    ray job submit --working-dir . -- python -m tokenizer --config demo --set tokens.out=/abs/tokens

or run it here with an embedded local Ray. Prints one JSON line with the tokenizer and cache paths.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.command import add_config_arguments, print_config, run_command
    from pipeline.ray_context import add_ray_arguments

    parser = argparse.ArgumentParser(
        prog="python -m tokenizer",
        description="Stage 1: train the visual tokenizer (unless current), then precompute its token cache.",
    )
    add_config_arguments(parser, "tokenizer")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    def command() -> int:
        from tokenizer.stage1 import load_stage1_config, run_stage1

        cfg = load_stage1_config(args.config, args.overrides)
        if print_config(args, cfg):
            return 0
        result = run_stage1(cfg, address=args.address, num_cpus=args.num_cpus)
        print(json.dumps(result), flush=True)
        return 0

    return run_command("python -m tokenizer", command)


if __name__ == "__main__":
    sys.exit(main())
