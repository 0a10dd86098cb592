"""``mimflow pretrain`` and ``mimflow export`` (``python -m pretrain`` is the same job, for ``ray job submit``)."""

from __future__ import annotations

import argparse
import json

from pipeline.errors import StageError
from pipeline.command import add_config_arguments


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.ray_context import add_ray_arguments

    add_config_arguments(parser, "pretrain")
    add_ray_arguments(parser)


def pretrain_command(args: argparse.Namespace) -> int:
    from pipeline.command import print_config
    from pipeline.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import run_pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if print_config(args, cfg):
        return 0
    result = run_pretrain(cfg, address=args.address, num_cpus=args.num_cpus)
    print(json.dumps({"checkpoint": result.checkpoint_dir, "encoder": result.encoder_dir,
                      "metrics": result.metrics}), flush=True)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from pretrain.export import export_encoder

    try:
        out = export_encoder(args.checkpoint, args.out)
    except (ValueError, KeyError) as e:
        raise StageError(f"cannot export {args.checkpoint}: {e}") from None
    from pipeline import storage

    how = (f"pretrain.export.load_encoder('{out}')" if storage.is_uri(out) else  # safetensors reads local files only
           f"timm.models.beit.Beit(**config['timm_kwargs']).load_state_dict(safetensors.torch.load_file("
           f"'{out}/model.safetensors'), strict=True)")
    print(f"exported the encoder of {args.checkpoint} to {out}: load it with {how}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="masked image modeling pretraining (Ray Train DDP)",
        description="Pretrain a BEiT encoder on a token cache with Ray Train. A rerun with the same "
        "run_name and out resumes from the newest checkpoint; the encoder is exported to "
        "<out>/<run_name>/encoder at the end.",
    )
    add_pretrain_arguments(p)
    p.set_defaults(handler=pretrain_command)
    p = sub.add_parser(
        "export",
        help="export a pretrained encoder for timm",
        description="Write model.safetensors + config.json that timm's Beit loads with strict=True.",
    )
    p.add_argument("checkpoint", help="a checkpoint_* directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=export_command)
