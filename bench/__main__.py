"""``python -m bench [--size cpu|gpu] [--only NAME]``: every bench/bench_*.py, one JSON line each figure.

Results accumulate in bench/results/<date>-<host>.jsonl. Each script runs in its own process so one
benchmark's threads and memory do not colour the next.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--only", action="append", default=[], help="run only bench_NAME (repeatable)")
    args = parser.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{args.size}.jsonl"
    failed = []
    for script in scripts:
        print(f"== {script.stem} ({args.size})", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{script.stem}", "--size", args.size],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        with out.open("a") as f:
            for line in lines:
                f.write(line + "\n")
                rec = json.loads(line)
                fig = {k: rec[k] for k in ("bench", "figure", "reference", "ratio", "target") if k in rec}
                print("  " + json.dumps(fig), flush=True)
        if proc.returncode != 0:
            failed.append(script.stem)
            print(proc.stderr[-3000:], file=sys.stderr)
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
    print(f"results: {out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
