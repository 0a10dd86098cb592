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
    imp = tsub.add_parser(
        "import",
        help="import a released tokenizer (DALL-E dVAE, BEiT v2 VQ-KD) as a mimflow tokenizer directory",
        description="Read a released checkpoint without running code from it (allow-list unpickler) and write "
        "config.json + model.safetensors like a trained tokenizer. dalle-dvae: OpenAI's encoder.pkl (and "
        "--decoder decoder.pkl); beitv2-vqkd: vqkd_encoder_base_decoder_*.pth.",
    )
    imp.add_argument("kind", choices=["dalle-dvae", "beitv2-vqkd"], help="what the checkpoint is")
    imp.add_argument("checkpoint", help="the released file (encoder.pkl or vqkd_*.pth)")
    imp.add_argument("--out", help="the tokenizer directory to write")
    imp.add_argument("--decoder", help="dalle-dvae: decoder.pkl, so that tokens can be decoded to pixels")
    imp.add_argument("--input-size", type=int, help="dalle-dvae: input pixels (default 112, as BEiT v1)")
    imp.add_argument("--num-heads", type=int, help="beitv2-vqkd: attention heads (default width / 64)")
    imp.add_argument("--print-config", action="store_true", help="print what was recognised and exit")
    imp.set_defaults(handler=_import)
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


def _import(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from tokenizer.released.importer import import_released, recognise

    if args.print_config:
        import json

        from tokenizer.base import config_to_dict

        rec = recognise(args.kind, args.checkpoint, args.decoder, args.input_size, args.num_heads)
        print("\n".join(rec.describe()))
        print(json.dumps(config_to_dict(rec.config), indent=2, sort_keys=True))
        return 0
    if not args.out:
        raise ConfigError("tokenizer import needs --out DIR (or --print-config)")
    tid = import_released(args.kind, args.checkpoint, args.out, args.decoder, args.input_size, args.num_heads)
    print(f"imported {args.kind} as tokenizer {tid} in {args.out}")
    return 0
