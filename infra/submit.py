"""Submit a mimflow stage as a Ray job: `ray job submit --working-dir . --runtime-env-json {excludes}`.

    python -m infra.submit tokenizer -- --config demo --set tokens.out=/abs/tokens --set tokenizer.out=/abs/tok
    python -m infra.submit pretrain  -- --config demo --set data.tokens=/abs/tokens/<id> ...
    python -m infra.submit eval      -- --config demo --set encoder=/abs/encoder
    python -m infra.submit codebook  -- --tokens /abs/tokens/<id> --tokenizer /abs/tok --out /abs/codebook
    python -m infra.submit refresh   -- --tokenizer /abs/tok --source /abs/images --out /abs/tokens

Where the job goes: --address (the dashboard URL, http://HOST:8265), else $RAY_API_SERVER_ADDRESS, else an
http:// $RAY_ADDRESS, else the local cluster recorded in --state-dir (default ~/.mimflow/cluster), whose
auth token is then used too. For a remote cluster with token auth, export RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) yourself; the token never goes into the upload or the job.

The working dir (default: the repository root) is zipped and uploaded; `.git`, virtualenvs, data and
output dirs, caches and secrets are excluded (the upload limit is 100 MiB, checked here first). The job
runs from that copy on the cluster, so data paths must be absolute (on storage every node sees) or URIs
(s3://, gs://): a relative --source/--out/--tokens/... gets a warning. The cluster's Python must already
have mimflow's dependencies (the local cluster uses this venv; real clusters use the mimflow image, see
docs/DEPLOY.md); with --no-working-dir nothing is uploaded and the image's installed mimflow runs.

Prints the job id, then follows the job's logs until it ends (exit code 0 = job succeeded); --no-wait
returns right after submission. The upload rules are in ``infra.submit_upload``, the path checks in
``infra.submit_paths``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from infra.submit_paths import relative_path_warnings
from infra.submit_upload import DEFAULT_EXCLUDES, UPLOAD_LIMIT_MIB, estimate_upload

REPO_ROOT = Path(__file__).resolve().parent.parent

STAGES: dict[str, list[str]] = {
    "tokenizer": ["python", "-m", "tokenizer"],
    "pretrain": ["python", "-m", "pretrain"],
    "eval": ["python", "-m", "eval"],
    "codebook": ["python", "-m", "mimflow", "codebook", "report"],
    "refresh": ["python", "-m", "mimflow", "tokens", "refresh"],
}


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Where to submit


@dataclass
class Target:
    address: str  # dashboard URL
    env: dict[str, str]  # environment for the `ray job` subprocess
    source: str  # where the address came from, for messages


def resolve_target(address: str | None = None, state_dir: str | Path | None = None,
                   base_env: dict[str, str] | None = None) -> Target:
    env = dict(os.environ if base_env is None else base_env)
    if address:
        return Target(address, env, "--address")
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        val = env.get(var, "")
        if val.startswith(("http://", "https://")) and state_dir is None:
            return Target(val, env, f"${var}")
    from infra.cluster_procs import cluster_running
    from infra.cluster_state import DEFAULT_STATE_DIR, load_cluster

    info = load_cluster(state_dir)
    where = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
    if info is None or not cluster_running(info):
        raise SubmitError(
            f"no Ray cluster to submit to: pass --address http://HOST:8265, set RAY_API_SERVER_ADDRESS, "
            f"or start a local one (no running cluster recorded in {where}): "
            f"python -m infra.local_cluster start"
        )
    return Target(info.dashboard_url, info.client_env(env), f"local cluster ({where})")


# --------------------------------------------------------------------------------------------------
# Submit


# Set for every job's driver and workers (--env overrides): Ray Train's preemption watcher (spot-instance
# notices) logs an error per run on clusters that have none; the embedded Ray turns it off the same way
# (pipeline.ray_context.start_local_ray).
JOB_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def new_submission_id(stage: str) -> str:
    return f"mimflow-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def build_command(
    stage: str,
    stage_args: Sequence[str],
    *,
    address: str,
    submission_id: str,
    working_dir: Path | None,
    excludes: Sequence[str] = (),
    env_vars: dict[str, str] | None = None,
    no_wait: bool = False,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
) -> list[str]:
    """The `ray job submit` command line (this interpreter's Ray CLI) for one stage."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    runtime_env: dict = {}
    if working_dir is not None:
        runtime_env["excludes"] = list(DEFAULT_EXCLUDES) + [e for e in excludes if e not in DEFAULT_EXCLUDES]
    runtime_env["env_vars"] = {**JOB_ENV, **(env_vars or {})}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
           "--submission-id", submission_id, "--log-style", "record"]
    if working_dir is not None:
        cmd += ["--working-dir", str(working_dir)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env, separators=(",", ":"))]
    if entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(entrypoint_num_cpus)]
    if entrypoint_num_gpus is not None:
        cmd += ["--entrypoint-num-gpus", str(entrypoint_num_gpus)]
    if no_wait:
        cmd.append("--no-wait")
    cmd += ["--", *STAGES[stage], *stage_args]
    return cmd


@dataclass
class SubmitResult:
    job_id: str
    returncode: int  # of `ray job submit`: with waiting, 0 iff the job succeeded
    command: list[str]


def submit(
    stage: str,
    stage_args: Sequence[str] = (),
    *,
    address: str | None = None,
    state_dir: str | Path | None = None,
    working_dir: str | Path | None = REPO_ROOT,
    excludes: Sequence[str] = (),
    env_vars: dict[str, str] | None = None,
    wait: bool = True,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    max_upload_mib: float = UPLOAD_LIMIT_MIB,
    dry_run: bool = False,
    capture: bool = False,
    timeout: float | None = None,
) -> SubmitResult:
    """Submit `stage` with `stage_args`; follow its logs unless wait=False. Warnings go to stderr."""
    wd = None if working_dir is None else Path(working_dir).resolve()
    target = resolve_target(address, state_dir)
    for w in relative_path_warnings(stage_args, cwd=wd):
        print(f"warning: {w}", file=sys.stderr)
    for k in (env_vars or {}):
        if re.search(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL)", k, re.I):
            print(f"warning: env var {k} looks like a secret; runtime-env vars are stored in the cluster's GCS "
                  f"and shown in the dashboard. Give secrets to the cluster's nodes instead (k8s Secret, IAM role).",
                  file=sys.stderr)
    if wd is not None:
        if not wd.is_dir():
            raise SubmitError(f"working dir {wd} does not exist")
        est = estimate_upload(wd, list(DEFAULT_EXCLUDES) + list(excludes))
        if est is not None:
            if est.mib >= max_upload_mib:
                big = "\n".join(f"  {b / 2**20:8.1f} MiB  {p}" for b, p in est.largest)
                raise SubmitError(
                    f"the working dir upload would be {est.mib:.1f} MiB ({est.files} files), over Ray's "
                    f"{max_upload_mib:.0f} MiB limit. Largest files:\n{big}\nMove data out of the working dir "
                    f"or exclude it (--exclude PATTERN, .rayignore)."
                )
            print(f"uploading {wd} ({est.files} files, {est.mib:.1f} MiB)", file=sys.stderr)

    job_id = submission_id or new_submission_id(stage)
    cmd = build_command(stage, stage_args, address=target.address, submission_id=job_id, working_dir=wd,
                        excludes=excludes, env_vars=env_vars, no_wait=not wait,
                        entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)
    print(f"job id: {job_id}  ({target.address}, via {target.source})", file=sys.stderr, flush=True)
    if dry_run:
        print(shlex.join(cmd))
        return SubmitResult(job_id, 0, cmd)
    try:
        proc = subprocess.run(cmd, env=target.env, cwd=str(wd or Path.cwd()), timeout=timeout,
                              capture_output=capture, text=capture)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Logs: ray job logs -f {job_id}; "
              f"stop it: ray job stop {job_id}", file=sys.stderr)
        return SubmitResult(job_id, 130, cmd)
    if capture:
        sys.stdout.write(proc.stdout or "")
        sys.stderr.write(proc.stderr or "")
    status = "submitted" if not wait else ("succeeded" if proc.returncode == 0 else "FAILED")
    print(f"job {job_id} {status}" + ("" if wait else f"; follow it: ray job logs -f {job_id}"),
          file=sys.stderr)
    return SubmitResult(job_id, proc.returncode, cmd)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, stage_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m infra.submit", description=__doc__.split("\n\n")[0],
        epilog="Everything after `--` goes to the stage. " + ", ".join(
            f"{k}: {' '.join(v)}" for k, v in STAGES.items()),
    )
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--address", default=None, help="dashboard URL of the cluster (http://HOST:8265)")
    parser.add_argument("--state-dir", default=None, help="local cluster state dir (default ~/.mimflow/cluster)")
    parser.add_argument("--working-dir", default=str(REPO_ROOT), help="uploaded as the job's cwd (default: repo root)")
    parser.add_argument("--no-working-dir", action="store_true",
                        help="upload nothing: run the mimflow installed in the cluster's image")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="extra gitignore-style pattern kept out of the upload (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (not for secrets; repeatable)")
    parser.add_argument("--submission-id", default=None, help="job id (default mimflow-STAGE-DATE-RANDOM)")
    parser.add_argument("--no-wait", action="store_true", help="return after submission, do not follow logs")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None)
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None)
    parser.add_argument("--max-upload-mib", type=float, default=UPLOAD_LIMIT_MIB)
    parser.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command only")
    args, unknown = parser.parse_known_args(argv)
    stage_args = unknown + stage_args  # tolerate stage flags given before `--`
    env_vars = {}
    for kv in args.env:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            parser.error(f"--env expects KEY=VALUE, got {kv!r}")
        env_vars[k] = v
    try:
        res = submit(
            args.stage, stage_args, address=args.address, state_dir=args.state_dir,
            working_dir=None if args.no_working_dir else args.working_dir, excludes=args.exclude,
            env_vars=env_vars or None, wait=not args.no_wait, submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
            max_upload_mib=args.max_upload_mib, dry_run=args.dry_run,
        )
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(res.job_id)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
