"""``mimflow tokenizer ...`` and ``mimflow tokens ...``."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from pipeline.command import add_config_arguments
    from pipeline.ray_context import add_ray_arguments

    p = sub.add_parser("tokenizer", help="train a visual tokenizer (dVAE or VQ-KD)")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tsub.add_parser(
        "train",
        help="train a tokenizer as a Ray Train job (resumes a run; skips if the output is current)",
        description="Train a dVAE or VQ-KD tokenizer on any data source. Packaged recipes: "
        "demo (= vqkd_demo), vqkd_demo, dvae_demo, vqkd_base, dvae_base.",
    )
    add_config_arguments(train, "tokenizer")
    add_ray_arguments(train)
    train.set_defaults(handler=_train)
    from tokenizer.cache_cli import register_tokens

    register_tokens(sub)  # tokens build|refresh|verify|show|list


def _train(args: argparse.Namespace) -> int:
    from pipeline.command import print_config
    from pipeline.config import load_config
    from pipeline.ray_context import ray_session
    from tokenizer.train import train_tokenizer
    from tokenizer.train_config import TokenizerTrainConfig

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    if print_config(args, cfg):
        return 0
    with ray_session(args.address, args.num_cpus):
        train_tokenizer(cfg, address=args.address)
    return 0
