"""``mimflow codebook report --tokens CACHE [--tokenizer DIR] [--source SRC] --out DIR [--compare OTHER]``."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    from eval.codebook.report import codebook_report

    codebook_report(
        args.tokens,
        args.out,
        tokenizer_dir=args.tokenizer,
        source=args.source,
        compare=args.compare,
        sample=args.sample,
        address=args.address,
        num_cpus=args.num_cpus,
        duplicate_threshold=args.threshold,
        clusters=args.clusters,
        mosaic_codes=args.mosaic_codes,
        quiet=args.quiet,
    )
    return 0


def register_codebook(sub) -> None:
    from pipeline.ray_context import add_ray_arguments

    p = sub.add_parser("codebook", help="codebook utilisation report (FAISS)")
    cb_sub = p.add_subparsers(dest="codebook_command", metavar="ACTION", required=True)
    r = cb_sub.add_parser(
        "report",
        help="usage, dead codes, perplexity, drift, per-class usage; with --tokenizer also FAISS geometry and agreement",
        description="Writes report.json, codes.parquet, PNG figures and a self-contained report.html into --out.",
    )
    r.add_argument("--tokens", required=True, help="token cache directory (tokens/<tokenizer_id>/, local or URI)")
    r.add_argument("--tokenizer", default=None, help="tokenizer checkpoint directory: adds code geometry and the agreement check")
    r.add_argument("--source", default=None, help="the cache's data source: class names and a staleness check of its fingerprint")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--compare", default=None, metavar="OTHER_REPORT", help="another report.json (or its directory) to compare with")
    r.add_argument("--sample", type=int, default=256, help="images re-encoded for the agreement check (default: 256)")
    r.add_argument("--threshold", type=float, default=0.95, help="cosine above which two codes are near-duplicates (default: 0.95)")
    r.add_argument("--clusters", type=int, default=None, help="k-means groups of the codebook (default: about sqrt(K))")
    r.add_argument("--mosaic-codes", type=int, default=8, help="most and least used codes shown in the mosaic (default: 8 each)")
    r.add_argument("--quiet", action="store_true", help="no progress or summary")
    add_ray_arguments(r)
    r.set_defaults(handler=cmd_report)
