"""The one way a stage gets Ray: an embedded local Ray by default, or a cluster.

``--address`` or ``RAY_ADDRESS`` (set by ``ray job submit`` for the job's driver) selects a cluster;
otherwise a local Ray is started in-process with this machine's CPUs, bound to loopback. A stage
wraps its work in ``with ray_session(address):`` and never asks which one it got.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pipeline.config import ConfigError

_started_here = False  # whether the session's Ray was started by this process (see require_gpu)


def add_ray_arguments(parser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else start an embedded local Ray)",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray (default: all)"
    )


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not sys.stdout.isatty():  # worker lines in a log file or a job log: no colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray each time it prints a worker line
    import ray

    if ray.is_initialized():  # a caller (a test, `mimflow run`) already holds one: share it
        yield
        return
    global _started_here
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address:
        ray.init(address=address, **common)
    else:
        start_local_ray(num_cpus or os.cpu_count(), **common)
    _started_here = not address
    try:
        yield
    finally:
        ray.shutdown()
        _started_here = False


def start_local_ray(num_cpus: int | None, **init_kwargs) -> None:
    """``ray.init`` a local Ray on loopback, its dashboard on a known port that its workers are told.

    The dashboard stays on: Ray Train V2's placement-group cleaner polls the state API it serves. The
    cleaner finds that API through ``RAY_API_SERVER_ADDRESS``, else by looking for *the* Ray on this
    machine, which fails (a traceback per run) while another one runs, e.g. a `ray start` cluster or
    a second `mimflow` command. The variable goes to this Ray's workers only (the job's runtime
    environment), not to this process, whose subprocesses may talk to other clusters. Ray Train's
    preemption watcher (spot-instance notices) is off: there is nothing to preempt on one machine.
    """
    import ray

    _bind_loopback()
    _private_token_file()
    # "Token authentication is enabled for this Ray cluster": true, and says nothing to act on here
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
        # one machine has no spot preemption to watch for; the watcher's actor logs an error line per run
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "pipeline.ray_context.quiet_ray_noise"}
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env=runtime_env, **init_kwargs)


# Ray loggers whose warnings say themselves that they are harmless when transient ("safe to ignore ...
# CPU being overloaded"), but come with a full traceback: on a loaded machine, a screenful per minute.
ONE_LINE_LOGGERS = ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def quiet_ray_noise() -> None:
    """Worker setup hook of the Ray started here (every worker and actor of its jobs, Ray Train's
    controller included): the known harmless warnings keep their one line and lose their traceback."""
    for name in ONE_LINE_LOGGERS:
        logger = logging.getLogger(name)
        if _without_traceback not in logger.filters:
            logger.addFilter(_without_traceback)


def _bind_loopback() -> None:
    """Keep every process of the Ray started here on 127.0.0.1, whatever was imported first.

    Ray 2.60 on Linux swaps a loopback node IP for the machine's routable one (gcs, raylet and workers
    then listen on every interface, agents on that address) unless told it runs on a single machine.
    Ray reads that setting into a constant when it is first imported (``import ray.train`` does it),
    so setting the variable is not enough in a process that imported Ray before: the constant is set
    too. The variable is still needed: the processes ``ray.init`` spawns read it when they start.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _private_token_file() -> None:
    """Ray 2.60's ``ray.init`` turns token auth on and, when no token exists, writes one to
    ``~/.ray/auth_token`` with the umask's mode (0644 here): every local user could read it and drive
    this Ray. The token file is made here first, mode 0600 (or an existing one of ours tightened)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the caller chose the token
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits, hex


def quiet_train_worker_logs() -> None:
    """In a Ray Train worker: Ray Train logs every report, checkpoint and DDP wrap at INFO; the stages'
    own progress lines say enough."""
    for name in ("ray.train", "ray.train.torch", "ray.train.v2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # some log on loggers named after their module's file (Ray 2.60 internals)
        from ray.train.v2._internal.execution import context as train_context
        from ray.train.v2._internal.execution import storage as train_storage

        for module in (train_context, train_storage):
            logging.getLogger(module.__file__).setLevel(logging.WARNING)
    except Exception:  # pragma: no cover - best effort across Ray versions
        pass
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "Could not load library with AVX2 ..."


def require_gpu(log: Callable[[str], None]) -> None:
    """Before asking for GPU workers on a cluster that has none now: an error on a Ray this process
    started (nothing will add a GPU), a warning on a cluster (an autoscaler may add a GPU node, and
    Ray waits for it)."""
    if cluster_has_gpu():
        return
    if _started_here:
        raise ConfigError("use_gpu is true but this machine's Ray has no GPU "
                          "(set use_gpu=false, or pass --address of a cluster with GPUs)")
    log("warning: use_gpu is true and the Ray cluster has no GPU yet: waiting for one "
        "(an autoscaler must add a GPU node)")


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def started_here() -> bool:
    """Whether this process started the session's Ray (nothing will add nodes to it)."""
    return _started_here
