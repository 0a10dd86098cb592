"""Tokenizer encode throughput: images/s of ``tok.encode`` on in-memory batches.

    python -m bench.bench_tokenizer --size cpu      # or: gpu

One JSON line per (tokenizer, size): the demo recipes (vqkd_demo, dvae_demo) and the papers' base
sizes (vqkd_base: ViT-B/16 at 224 px, 8192x32 codebook; dvae_base: 112 px, vocab 8192), with
randomly initialised weights (throughput does not depend on the values). This is the ceiling the
token-cache stage (decode + views + encode + tar writing) is measured against.

``--size cpu`` uses this process's threads and small batch counts (well under a minute);
``--size gpu`` uses the GPU in fp32 and, as a second figure per model, under bf16 autocast.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# recipe -> (batch size, timed batches) per --size
SIZES = {
    "cpu": {"vqkd_demo": (64, 30), "dvae_demo": (64, 20), "vqkd_base": (4, 2), "dvae_base": (8, 2)},
    "gpu": {"vqkd_demo": (1024, 20), "dvae_demo": (1024, 20), "vqkd_base": (256, 10), "dvae_base": (256, 10)},
}


def throughput(tok, batch: int, batches: int, device, autocast: bool = False) -> tuple[float, float]:
    """(images/s over ``batches`` timed batches after one warm-up, seconds timed)."""
    import torch

    x = torch.rand(batch, 3, tok.input_size, tok.input_size, device=device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = tok.encode(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up (allocations, kernels)
    start = time.perf_counter()
    for _ in range(batches):
        run()
    seconds = time.perf_counter() - start
    return batch * batches / seconds, seconds


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from bench.common import emit, size_parser
    from pipeline.config import load_config
    from tokenizer.checkpoint import build_tokenizer
    from tokenizer.train_config import TokenizerTrainConfig

    parser = size_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="only this recipe (repeatable)")
    args = parser.parse_args(argv)
    if args.size == "gpu" and not torch.cuda.is_available():
        print("bench_tokenizer: --size gpu needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.size == "gpu" else "cpu")
    for recipe, (batch, batches) in SIZES[args.size].items():
        if args.only and recipe not in args.only:
            continue
        model_cfg = load_config(TokenizerTrainConfig, recipe).model
        torch.manual_seed(0)
        tok = build_tokenizer(model_cfg).to(device).eval()
        params = sum(p.numel() for p in tok.export_state_dict().values())
        modes = [False, True] if device.type == "cuda" else [False]
        for amp in modes:
            rate, seconds = throughput(tok, batch, batches, device, autocast=amp)
            emit({
                "bench": "tokenizer_encode",
                "name": f"{recipe}{'-bf16' if amp else ''}",
                "figure": round(rate, 1),
                "unit": "images/s",
                "sizes": {
                    "recipe": recipe, "kind": model_cfg.kind, "input_size": model_cfg.input_size,
                    "grid": model_cfg.grid, "vocab_size": model_cfg.vocab_size, "width": model_cfg.width,
                    "depth": model_cfg.depth, "params_m": round(params / 1e6, 2), "batch": batch,
                    "batches": batches, "seconds": round(seconds, 2), "device": device.type,
                    "dtype": "bf16-autocast" if amp else "fp32", "threads": torch.get_num_threads(),
                },
            })
        del tok
    return 0


if __name__ == "__main__":
    sys.exit(main())
