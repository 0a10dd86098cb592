"""``mimflow tokens build|refresh|verify|show``: the offline token cache from the command line.

Heavy imports (torch, ray) stay inside the handlers so that ``mimflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import json

from pipeline.errors import ConfigError
from pipeline.views import INTERPOLATIONS, ViewStyle

SOURCE_HELP = "source spec: a folder, WebDataset tars (s-{000..009}.tar), idx:DIR or shapes?n=..&size=.."


def _style_changes(args: argparse.Namespace) -> dict:
    """The view-style flags given (refresh: the ones to change; build: over the defaults)."""
    scale = tuple(args.crop_scale) if args.crop_scale is not None else None
    changes = {"scale": scale, "jitter": args.jitter, "interp": args.interp, "tok_interp": args.tok_interp}
    return {k: v for k, v in changes.items() if v is not None}


def _style(args: argparse.Namespace) -> ViewStyle:
    try:
        return ViewStyle().with_(**_style_changes(args))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def cmd_build(args: argparse.Namespace) -> int:
    from tokenizer.precompute import build_cache

    report = build_cache(
        args.tokenizer,
        args.source,
        args.out,
        args.views,
        batch_size=args.batch_size,
        num_actors=args.actors,
        seed=args.seed,
        address=args.address,
        num_cpus=args.num_cpus,
        progress_every=args.progress_every,
        style=_style(args),
    )
    print(report.cache_dir)
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from tokenizer.cache_ops import refresh

    _style(args)  # the flags are checked here; refresh applies them over the last cache's style
    report = refresh(
        args.tokenizer,
        args.out,
        args.source,
        args.views,
        seed=args.seed,
        batch_size=args.batch_size,
        num_actors=args.actors,
        address=args.address,
        num_cpus=args.num_cpus,
        gc=args.gc,
        progress_every=args.progress_every,
        style=_style_changes(args),
    )
    print(report.cache_dir)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tokenizer.cache_verify import verify_cache, verify_json

    report = verify_cache(args.cache_dir, decode_images=args.decode_images)
    print(verify_json(report) if args.json else report.summary(), flush=True)
    return 0 if report.ok else 1


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.token_cache import check_cache
    from tokenizer.cache_show import show, size_line

    info, _ = check_cache(args.cache_dir)
    print(f"{args.cache_dir}: {size_line(info)}")
    rows = show(args.cache_dir, args.out, args.keys, n=args.n, tokenizer_dir=args.tokenizer, cell=args.cell)
    decoded = " with dVAE decodes" if any(r.decoded is not None for r in rows) else ""
    print(f"wrote {args.out}: {len(rows)} view(s) of {len({r.key for r in rows})} sample(s){decoded}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tokenizer.cache_ops import list_caches

    entries = list_caches(args.out)
    if args.json:
        print(json.dumps([{"tokenizer_id": e.tokenizer_id, "path": e.path, "complete": e.complete,
                           **(asdict(e.info) if e.info else {})} for e in entries]))
        return 0
    if not entries:
        print(f"no token caches under {args.out}")
    for e in entries:
        i = e.info
        if i is None:
            print(f"{e.tokenizer_id}  {'complete' if e.complete else 'incomplete':10s}  (no readable cache info)")
            continue
        print(
            f"{e.tokenizer_id}  {'complete':10s}  {i.samples} samples, {i.errors} errors, "
            f"views={i.views}, source={i.source!r}, created {i.created}"
        )
    return 0


def _build_args(p: argparse.ArgumentParser, refresh: bool) -> None:
    from pipeline.ray_context import add_ray_arguments

    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory (config.json + model.safetensors)")
    p.add_argument(
        "--source",
        required=not refresh,
        default=None,
        help=SOURCE_HELP + (" (default: the source of the last cache under --out)" if refresh else ""),
    )
    p.add_argument("--out", required=True, help="cache root: the cache goes to OUT/<tokenizer_id>/")
    p.add_argument(
        "--views",
        type=int,
        default=None if refresh else 1,
        help="views per image: 1 = centre crop, >1 = seeded random-resized crops + flips"
        + (" (default: as the last cache)" if refresh else " (default: 1)"),
    )
    p.add_argument("--seed", type=int, default=None if refresh else 0, help="seed of the views")
    as_last = " (default: as the last cache)" if refresh else ""
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="area range of the random views' crops" + (as_last or " (default: 0.4 1)"))
    p.add_argument("--jitter", type=float, default=None,
                   help="colour-jitter strength of brightness, contrast and saturation for random views "
                   "(BEiT: 0.4)" + (as_last or " (default: 0, none)"))
    p.add_argument("--interp", choices=sorted(INTERPOLATIONS), default=None,
                   help="resampling of the image side, what the ViT sees" + (as_last or " (default: bicubic)"))
    p.add_argument("--tok-interp", choices=sorted(INTERPOLATIONS), default=None,
                   help="resampling of the tokenizer side (BEiT with DALL-E: lanczos)" + (as_last or " (default: bicubic)"))
    p.add_argument("--batch-size", type=int, default=64, help="views per encode batch (default: 64)")
    p.add_argument("--actors", type=int, default=None, help="encoding actors (default: one per GPU, else per CPU)")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    add_ray_arguments(p)


def register_tokens(sub) -> None:
    tokens = sub.add_parser("tokens", help="build, refresh, verify and show the offline token cache")
    tsub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)

    p = tsub.add_parser("build", help="precompute visual tokens into WebDataset shards (a Ray job; resumes)")
    _build_args(p, refresh=False)
    p.set_defaults(handler=cmd_build)

    p = tsub.add_parser(
        "refresh",
        help="rebuild only what is stale (new tokenizer, changed source); a no-op when current",
    )
    _build_args(p, refresh=True)
    p.add_argument("--gc", action="store_true", help="remove superseded caches and unlisted files under --out")
    p.set_defaults(handler=cmd_refresh)

    p = tsub.add_parser("verify", help="check every shard against the manifest; non-zero exit on a problem")
    p.add_argument("cache_dir", help="a cache directory, OUT/<tokenizer_id>")
    p.add_argument("--decode-images", action="store_true", help="also decode every stored image")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(handler=cmd_verify)

    p = tsub.add_parser("show", help="images beside their token maps (and dVAE decodes) as a PNG")
    p.add_argument("cache_dir", help="a cache directory, OUT/<tokenizer_id>")
    p.add_argument("keys", nargs="*", help="sample keys to show (default: the first --n)")
    p.add_argument("--n", type=int, default=8, help="samples to show when no key is given (default: 8)")
    p.add_argument("--out", default="tokens.png", help="PNG to write (default: tokens.png)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for dVAE decodes (default: the one the cache info names)")
    p.add_argument("--cell", type=int, default=128, help="tile size in pixels (default: 128)")
    p.set_defaults(handler=cmd_show)

    p = tsub.add_parser("list", help="the caches under an output root")
    p.add_argument("out", help="cache root")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_list)
