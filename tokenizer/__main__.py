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
    from pipeline.cli import add_config_arguments
    from pipeline.config import ConfigError
    from pipeline.ray_context import add_ray_arguments
    from pipeline.sources import SourceError

    parser = argparse.ArgumentParser(
        prog="python -m tokenizer",
        description="Stage 1: train the visual tokenizer (unless current), then precompute its token cache.",
    )
    add_config_arguments(parser, "tokenizer")
    add_ray_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        from pipeline.config import dump_config
        from pipeline.shards import CacheError
        from tokenizer.stage1 import load_stage1_config, run_stage1

        cfg = load_stage1_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        result = run_stage1(cfg, address=args.address, num_cpus=args.num_cpus)
    except (ConfigError, SourceError, CacheError, FileNotFoundError) as e:
        print(f"python -m tokenizer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m tokenizer: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
