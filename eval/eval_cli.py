"""``mimflow eval`` (and ``python -m eval``): a recipe plus ``--set`` overrides, or quick flags.

Kept free of torch/ray imports at module level: ``mimflow --help`` must stay instant.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.command import add_config_arguments, print_config
from pipeline.ray_context import add_ray_arguments

DESCRIPTION = """\
Evaluate an encoder on labelled data: weighted kNN (FAISS cosine, k=20, T=0.07), a linear probe on
frozen features, and fine-tuning on Ray Train, optionally against the same architecture randomly
initialised (--baseline random). Writes OUT/eval.json and prints a table.

  mimflow eval --config demo --set encoder=runs/encoder
  mimflow eval --encoder runs/encoder --train /data/imgs --methods knn,linear --baseline random --out runs/eval

The test set is --test when given, else the source's own split (shapes/IDX split=test, a val/ or
test/ folder beside train/), else a deterministic split of the source by key hash.
"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "eval", default=None)
    for action in parser._actions:
        if action.dest == "config":
            action.help = "packaged eval recipe name or a YAML path (default: demo; with --encoder and no --config, the built-in defaults)"
    q = parser.add_argument_group("quick flags (override the recipe; without --config, start from defaults)")
    q.add_argument("--encoder", help="exported encoder directory (config.json + model.safetensors)")
    q.add_argument("--train", dest="train_source", metavar="SOURCE", help="labelled training source spec")
    q.add_argument("--test", dest="test_source", metavar="SOURCE", help="labelled test source spec")
    q.add_argument("--methods", help="comma-separated: knn,linear,finetune")
    q.add_argument("--baseline", choices=["random", "none"], help="also evaluate a random-init encoder")
    q.add_argument("--pooling", choices=["cls", "mean"], help="feature pooling for kNN and the probe")
    q.add_argument("--layer", type=int, help="take features from this block (negative: from the end)")
    q.add_argument("--out", help="output directory (eval.json, config.yaml, feature cache)")
    add_ray_arguments(parser)


def register_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="kNN, linear probe and fine-tune evaluation",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(p)
    p.set_defaults(handler=handle_eval)


def config_from_args(args: argparse.Namespace):
    from pipeline.config import ConfigError, from_dict, load_config, to_dict

    from eval.eval_config import EvalConfig

    recipe = args.config or (None if args.encoder else "demo")
    cfg = load_config(EvalConfig, recipe, args.overrides)
    quick = {
        name: getattr(args, name)
        for name in ("encoder", "train_source", "test_source", "baseline", "pooling", "layer", "out")
        if getattr(args, name) is not None
    }
    if args.methods is not None:
        quick["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in quick["methods"] if m not in ("knn", "linear", "finetune")]
        if bad:
            raise ConfigError(f"--methods: unknown method(s) {bad}; choose from knn, linear, finetune")
    # through from_dict, so the quick flags are checked and resolved like the recipe's values
    return from_dict(EvalConfig, {**to_dict(cfg), **quick}) if quick else cfg


def handle_eval(args: argparse.Namespace) -> int:
    from eval.evaluate import format_table, run_eval

    cfg = config_from_args(args)
    if print_config(args, cfg):
        return 0
    doc = run_eval(cfg, address=args.address, num_cpus=args.num_cpus)
    print(format_table(doc))
    sys.stdout.flush()
    return 0
