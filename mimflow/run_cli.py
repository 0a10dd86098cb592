"""``mimflow run`` and ``mimflow demo``."""

from __future__ import annotations

import argparse
import json

from pipeline.command import add_config_arguments, print_config
from pipeline.ray_context import add_ray_arguments


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from mimflow.run import PipelineConfig, run_pipeline, stage_configs
    from mimflow.summary import print_summary

    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"out={args.out}")
    cfg = load_config(PipelineConfig, args.config, overrides)
    stage_configs(cfg)  # every stage's config checked before anything runs
    if print_config(args, cfg):
        return 0
    results = run_pipeline(cfg, address=args.address)
    print_summary(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="every stage in order, skipping those already current",
        description="tokenizer -> token cache -> codebook report -> pretraining -> evaluation; "
        "a stage whose config and inputs are unchanged since its last run is skipped.",
    )
    add_config_arguments(p, "run", default="demo")
    add_ray_arguments(p)
    p.add_argument("--out", default=None, help="output directory (overrides the recipe's `out`)")
    p.add_argument("--json", default=None, help="also write every stage's outputs as JSON here")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the built-in shapes data, embedded local Ray",
        description="`mimflow run --config demo`: about 10 minutes on 2 CPU cores; ends with a summary.",
    )
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    add_ray_arguments(p)
    p.set_defaults(handler=cmd_run, config="demo", overrides=[], json=None, print_config=False)
