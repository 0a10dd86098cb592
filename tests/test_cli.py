from __future__ import annotations

import subprocess
import sys

STAGES = ["data", "tokenizer", "tokens", "pretrain", "codebook", "eval", "run", "demo", "export"]


def test_help_lists_every_stage_without_loading_torch():
    code = (
        "import sys, mimflow.cli as c; p = c.build_parser(); "
        "print(p.format_help()); print('TORCH' if 'torch' in sys.modules else 'LEAN')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for stage in STAGES:
        assert f"    {stage}" in out, stage
    assert out.strip().endswith("LEAN")  # --help stays instant: stages import torch/ray lazily


def test_each_stage_has_help():
    from mimflow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for stage in STAGES:
        assert sub.choices[stage].format_help().startswith("usage: mimflow " + stage)
