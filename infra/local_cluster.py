"""A private, loopback-only Ray head for a laptop or a test: start it, submit jobs to it, stop exactly it.

    python -m infra.local_cluster start [--num-cpus 2] [--state-dir DIR] [--temp-dir DIR] [--no-auth]
    eval "$(python -m infra.local_cluster env)"      # then: ray job submit --working-dir . -- ...
    python -m infra.local_cluster status
    python -m infra.local_cluster stop

or from Python (tests)::

    with start_cluster(num_cpus=2, state_dir=tmp_path / "cluster") as cluster:
        subprocess.run([...ray job submit...], env=cluster.client_env())

What it does, and why:

* **Loopback only.** ``ray start --node-ip-address 127.0.0.1`` alone is not enough on Linux with Ray 2.60:
  Ray "resolves" a loopback node IP to the machine's routable address and its gRPC servers listen on
  every interface. Setting ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the head's environment makes Ray
  keep 127.0.0.1 as the node IP (the single-node mode Ray uses on laptops), so GCS, raylet, object
  manager, agents, client server and dashboard all listen on 127.0.0.1 only, and no other machine can
  join or reach it.
* **Token authentication stays on.** Ray 2.60 turns token auth on at ``ray start`` whenever a token is
  around (e.g. ``~/.ray/auth_token``), and the job CLI then fails with 401 unless the client runs with
  ``RAY_AUTH_MODE=token``. Instead of disabling it, every cluster gets its *own* random token, written
  to ``<state-dir>/auth_token`` (mode 0600) and handed to the head through ``RAY_AUTH_TOKEN_PATH``.
  Loopback keeps other machines out; the token keeps other local users (this is a shared machine) out
  of the dashboard and job API, which would otherwise run arbitrary code as us. ``env`` / ``client_env()``
  give a client ``RAY_AUTH_MODE=token`` and the token path. ``--no-auth`` starts the head with
  ``RAY_AUTH_MODE=disabled`` instead, for the case where the job CLI cannot be given the env.
* **Own temp dir and ports.** Every port Ray opens (GCS, dashboard, client server, node manager, object
  manager, metrics export, dashboard agent HTTP+gRPC, runtime-env agent, a block of worker ports) is
  picked free at start, below the kernel's ephemeral range and away from Ray's defaults, under a
  machine-wide lock, so concurrent test heads never collide with each other or with a default
  ``ray start``.
* **Stops what it started, nothing else.** ``ray start --block`` runs in a new session; its pid, the
  session id, the temp dir and a unique tag put in the head's environment (inherited by every Ray
  process, including job drivers that Ray puts in their own sessions) identify the cluster's
  processes. ``stop`` asks ``ray start`` to shut down (SIGTERM), then TERM/KILLs whatever of *those*
  processes is left. Never ``ray stop``, never by name. PIDs are checked against their start time so a
  recycled PID is never signalled.

This module starts a head, reports its status and is the CLI. The record and its state dir live in
``infra.cluster_state``, finding and stopping processes in ``infra.cluster_procs``, ports in
``infra.cluster_ports``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shlex
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

from infra.cluster_ports import PORT_FLAGS, all_ports_listening, pick_ports, ports_lock
from infra.cluster_procs import (CHILDREN, TAG_ENV, Cluster, cluster_processes, cluster_running, launch_logged,
                                 processes_referencing, read_stat, stop_cluster, stop_processes)
from infra.cluster_state import (DEFAULT_STATE_DIR, LOG_FILE, LOOPBACK, TOKEN_FILE, ClusterBusyError, ClusterError,
                                 ClusterInfo, cleanup_files, flock, load_cluster, resolve_state_dir, shell_env,
                                 write_state)

# Ray 2.60 on Linux swaps a loopback --node-ip-address for the routable address unless this is "0"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray names its unix sockets <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store; sun_path
# holds 107 bytes, so the temp dir must stay short (pytest's tmp_path usually does not).
MAX_TEMP_DIR_LEN = 40


# --------------------------------------------------------------------------------------------------
# Start / status


def _dashboard_ready(url: str, headers: dict[str, str]) -> bool:
    """The job API answers (the JobHead module loads a little after the dashboard itself)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url + "/api/jobs/", headers=headers)
    try:
        with opener.open(req, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_cluster(
    num_cpus: int = 2,
    state_dir: str | Path | None = None,
    temp_dir: str | Path | None = None,
    *,
    num_gpus: int | None = None,
    auth: str = "token",
    object_store_memory: int | None = None,
    timeout: float = 120.0,
    drain_timeout_s: float = 0.0,
    extra_env: dict[str, str] | None = None,
) -> Cluster:
    """Start a Ray head on 127.0.0.1 and wait until its job API answers.

    num_cpus: logical CPUs the head offers. state_dir: where cluster.json, the auth token and the
    `ray start` log go (default ~/.mimflow/cluster or $MIMFLOW_CLUSTER_DIR); one cluster per state dir.
    temp_dir: Ray's --temp-dir (default: a fresh /tmp/mimflow-ray-XXXX, removed at stop; a given one is
    kept). auth: "token" (a fresh per-cluster token) or "disabled". object_store_memory: bytes (Ray's
    default when None). drain_timeout_s: how long the head drains running tasks on SIGTERM before
    shutting down (Ray's default is 30 s; a local head has nobody to hand work to, so 0 = stop at once).
    extra_env: added to the head's environment (inherited by workers and jobs).

    Raises ClusterBusyError when the state dir already has a running cluster, ClusterError when the
    head does not come up (with the tail of its log).
    """
    if auth not in ("token", "disabled"):
        raise ValueError(f"auth must be 'token' or 'disabled', not {auth!r}")
    if num_cpus < 1:
        raise ValueError("num_cpus must be >= 1")
    state_dir = resolve_state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    with flock(state_dir / ".lock", 1.0, f"state dir {state_dir}"):
        old = load_cluster(state_dir)
        if old is not None:
            live = cluster_processes(old)
            if live:
                raise ClusterBusyError(
                    f"state dir {state_dir} already holds a running Ray cluster (dashboard "
                    f"{old.dashboard_url}, head pid {old.launcher_pid}, {len(live)} processes); stop it "
                    f"first: python -m infra.local_cluster stop --state-dir {shlex.quote(str(state_dir))}"
                )
            cleanup_files(old, keep_temp=False)  # stale record: its processes are gone

        owned = temp_dir is None
        if owned:
            temp_dir = Path(tempfile.mkdtemp(prefix="mimflow-ray-", dir="/tmp"))
        else:
            temp_dir = Path(temp_dir).expanduser().absolute()
            if len(str(temp_dir)) > MAX_TEMP_DIR_LEN:
                raise ClusterError(
                    f"temp dir {temp_dir} is {len(str(temp_dir))} characters; Ray's unix socket paths "
                    f"under it must fit 107 bytes, so keep it <= {MAX_TEMP_DIR_LEN} (e.g. /tmp/mf-xyz) "
                    f"or leave it out to get a fresh short one"
                )
            busy = processes_referencing(temp_dir)
            if busy:
                raise ClusterBusyError(f"temp dir {temp_dir} is in use by processes {busy}")
            temp_dir.mkdir(parents=True, exist_ok=True)

        token_path: Path | None = None
        if auth == "token":
            token_path = state_dir / TOKEN_FILE
            with contextlib.suppress(FileNotFoundError):
                token_path.unlink()
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))

        tag = uuid.uuid4().hex
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(k, None)
        venv_bin = str(Path(sys.executable).parent)  # `python` in job entrypoints = this interpreter
        env.update({
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "RAY_AUTH_MODE": auth,
            LOOPBACK_ENV: "0",  # keep 127.0.0.1 as node IP: loopback-only binds
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(float(drain_timeout_s)),
            TAG_ENV: tag,
        })
        if token_path is not None:
            env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        env.update(extra_env or {})

        log_path = state_dir / LOG_FILE
        with flock(ports_lock(), timeout, "the local port allocator"):
            ports, (wlo, whi) = pick_ports(random.Random())
            cmd = [
                sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                "--node-ip-address", LOOPBACK,
                "--dashboard-host", LOOPBACK,
                "--include-dashboard", "true",
                "--num-cpus", str(num_cpus),
                "--temp-dir", str(temp_dir),
                "--min-worker-port", str(wlo),
                "--max-worker-port", str(whi),
                "--disable-usage-stats",
                "--log-style", "record",
            ]
            for name, flag in PORT_FLAGS.items():
                cmd += [flag, str(ports[name])]
            # how Ray Train's placement-group cleaner finds this cluster's state API while other Rays
            # run on the machine (see pipeline.ray_context.start_local_ray)
            env["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{ports['dashboard']}"
            if num_gpus is not None:
                cmd += ["--num-gpus", str(num_gpus)]
            if object_store_memory is not None:
                cmd += ["--object-store-memory", str(int(object_store_memory))]

            proc = launch_logged(cmd, env, temp_dir, log_path)
            launcher = read_stat(proc.pid)
            info = Cluster(
                state_dir=state_dir, temp_dir=temp_dir, temp_dir_owned=owned,
                address=f"{LOOPBACK}:{ports['gcs']}", dashboard_url=f"http://{LOOPBACK}:{ports['dashboard']}",
                ports=ports, worker_ports=(wlo, whi), num_cpus=num_cpus, num_gpus=num_gpus,
                auth_mode=auth, token_path=token_path, tag=tag, launcher_pid=proc.pid,
                launcher_start=launcher.start if launcher else 0, pids={}, log_path=log_path,
                created=time.time(),
            )
            write_state(info)  # written before waiting: a crash mid-start still leaves a stoppable record

            deadline = time.monotonic() + timeout
            headers = info.auth_headers()
            ready = False
            try:
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        break
                    # Up = the job API answers and every component listens (the dashboard agent and
                    # the runtime-env agent come up a little after the dashboard).
                    if _dashboard_ready(info.dashboard_url, headers) and all_ports_listening(ports):
                        ready = True
                        break
                    time.sleep(0.5)
            except BaseException:  # interrupted while waiting: leave nothing running behind
                with contextlib.suppress(ClusterError):
                    stop_processes(info, timeout=20.0)
                cleanup_files(info, keep_temp=False)
                raise
        if not ready:
            why = (f"`ray start` exited with code {proc.returncode}" if proc.poll() is not None
                   else f"the job API at {info.dashboard_url} did not answer within {timeout:.0f}s")
            try:
                stop_processes(info, timeout=20.0)
            except ClusterError as e:
                why += f" (and cleaning up failed: {e})"
            cleanup_files(info, keep_temp=True)
            raise ClusterError(f"Ray head failed to start: {why}. Last lines of {log_path}:\n"
                               f"{_log_tail(log_path)}\n(Ray's own logs: {temp_dir}/session_latest/logs)")

        info.pids = {pid: p.start for pid, p in cluster_processes(info).items()}
        write_state(info)
        return info


def cluster_status(state_dir: str | Path | None = None) -> dict:
    """{'state': 'running'|'stopped'|'absent', ...}: 'stopped' means a stale state file (processes gone)."""
    info = load_cluster(state_dir)
    if info is None:
        return {"state": "absent", "state_dir": str(resolve_state_dir(state_dir))}
    live = cluster_processes(info)
    out = info.to_json()
    out.update({
        "state": "running" if live else "stopped",
        "live_pids": sorted(live),
        "job_api": _dashboard_ready(info.dashboard_url, info.auth_headers()) if live else False,
    })
    return out


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, state_dir: str | Path | None = None, **kwargs) -> Iterator[Cluster]:
    """`with local_cluster(2, tmp) as c:` == `with start_cluster(2, tmp) as c:`."""
    info = start_cluster(num_cpus, state_dir, **kwargs)
    try:
        yield info
    finally:
        info.stop()


# --------------------------------------------------------------------------------------------------
# CLI


def _print_started(info: ClusterInfo) -> None:
    auth_env = (f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(str(info.token_path))} "
                if info.token_path else "RAY_AUTH_MODE=disabled ")
    sd = "" if info.state_dir == DEFAULT_STATE_DIR else f" --state-dir {shlex.quote(str(info.state_dir))}"
    print(info.summary())
    print()
    print("Submit jobs (job code runs from an uploaded copy: give absolute paths or URIs):")
    print(f'  eval "$(python -m infra.local_cluster env{sd})"')
    print('  ray job submit --working-dir . -- python -c "import ray; ray.init(); print(ray.cluster_resources())"')
    print("or, in one line:")
    print(f"  RAY_ADDRESS={info.dashboard_url} {auth_env}ray job submit --working-dir . -- python -m tokenizer ...")
    print(f"or: python -m infra.submit{sd} tokenizer -- ...")
    print(f"Stop it with: python -m infra.local_cluster stop{sd}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=None,
                        help=f"cluster record, token and log (default {DEFAULT_STATE_DIR}, or $MIMFLOW_CLUSTER_DIR)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", help="start a loopback Ray head and wait for its job API")
    p.add_argument("--num-cpus", type=int, default=min(os.cpu_count() or 1, 4))
    p.add_argument("--num-gpus", type=int, default=None, help="default: Ray autodetects")
    p.add_argument("--temp-dir", default=None, help=f"Ray's --temp-dir (<= {MAX_TEMP_DIR_LEN} chars; default fresh under /tmp)")
    p.add_argument("--object-store-memory", type=int, default=None, help="bytes (default: Ray's)")
    p.add_argument("--no-auth", action="store_true",
                   help="start with RAY_AUTH_MODE=disabled (loopback only; any local user could submit jobs)")
    p.add_argument("--timeout", type=float, default=120.0)
    p = sub.add_parser("stop", help="stop exactly the processes of the recorded cluster")
    p.add_argument("--keep-temp", action="store_true", help="keep Ray's temp dir (logs)")
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("status", help="is the recorded cluster running? (exit 0 yes, 1 no)")
    p.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print `export` lines for `ray job` in this shell")
    for name in ("start", "stop", "status", "env"):  # accept --state-dir after the subcommand too
        sub.choices[name].add_argument("--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            info = start_cluster(args.num_cpus, args.state_dir, args.temp_dir, num_gpus=args.num_gpus,
                                 auth="disabled" if args.no_auth else "token",
                                 object_store_memory=args.object_store_memory, timeout=args.timeout)
            CHILDREN.clear()  # the head outlives this command on purpose
            _print_started(info)
            return 0
        if args.cmd == "stop":
            info = load_cluster(args.state_dir)
            pids = stop_cluster(args.state_dir, keep_temp=args.keep_temp, timeout=args.timeout)
            if info is None:
                print(f"no cluster recorded in {resolve_state_dir(args.state_dir)}")
            else:
                print(f"stopped the Ray cluster at {info.dashboard_url} ({len(pids)} processes: "
                      f"{' '.join(map(str, pids))})")
            return 0
        if args.cmd == "status":
            st = cluster_status(args.state_dir)
            if args.json:
                print(json.dumps(st, indent=2, sort_keys=True))
            elif st["state"] == "absent":
                print(f"no cluster recorded in {st['state_dir']}")
            else:
                info = ClusterInfo.from_json({k: v for k, v in st.items()
                                              if k not in ("state", "live_pids", "job_api")})
                print(info.summary())
                print(f"  state        {st['state']} ({len(st['live_pids'])} live processes, job API "
                      f"{'answering' if st['job_api'] else 'not answering'})")
            return 0 if st["state"] == "running" else 1
        if args.cmd == "env":
            info = load_cluster(args.state_dir)
            if info is None or not cluster_running(info):
                print(f"no running cluster recorded in {resolve_state_dir(args.state_dir)}; "
                      f"start one: python -m infra.local_cluster start", file=sys.stderr)
                return 1
            print(shell_env(info))
            # A client on this machine that dials the GCS (ray.init(address=...), `ray status`,
            # `mimflow --address`) must also take 127.0.0.1 as its own node IP, or its connection to
            # the loopback-only head times out (see start_cluster).
            print(f"export {LOOPBACK_ENV}=0")
            return 0
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
