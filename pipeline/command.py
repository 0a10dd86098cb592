"""What every entry point shares: the config arguments and one way to turn errors into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from pipeline.errors import USER_ERRORS


class Terminated(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, a pod's termination): unwinds like Ctrl-C, so `finally` blocks run."""


def add_config_arguments(parser: argparse.ArgumentParser, stage: str, default: str | None = "demo") -> None:
    parser.add_argument(
        "--config",
        default=default,
        help=f"packaged {stage} recipe name or a YAML path (default: {default})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (validated, absolute paths) as YAML and exit without starting Ray",
    )


def print_config(args: argparse.Namespace, cfg: Any) -> bool:
    """With ``--print-config``: print ``cfg`` as YAML and return True (the command then exits, having
    started nothing); otherwise False."""
    if not getattr(args, "print_config", False):
        return False
    from pipeline.config import dump_config

    print(dump_config(cfg), end="", flush=True)
    return True


def run_command(prog: str, command: Callable[[], int | None], interrupted: str = "finished work is kept, rerun to resume") -> int:
    """Run a command; errors a user can act on become one line on stderr and exit code 2; Ctrl-C and
    SIGTERM become one line saying what is kept, and exit code 130 / 143."""
    line = f"{prog}: interrupted; {interrupted}"
    fired: list[bool] = []  # set by the SIGTERM handler, which prints the line itself
    try:
        with _sigterm_as_interrupt(line, fired):
            return int(command() or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Terminated, or what Ray re-raises for it (ray.get raises a new one)
        if fired:
            return 128 + signal.SIGTERM
        print(line, file=sys.stderr)
        return 130


@contextlib.contextmanager
def _sigterm_as_interrupt(line: str, fired: list[bool]) -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread, after printing `line` at once: `ray job stop`
    SIGKILLs the job a few seconds later (RAY_JOB_STOP_WAIT_TIME_S, default 3), maybe before Ray's
    shutdown in the `finally` blocks ends.

    `ray.init` replaces the SIGTERM handler twice: a Python one that calls sys.exit, then the core
    worker's C++ failure handler, which prints a raw `*** SIGTERM received ***` stack and aborts. So
    the handler is installed again after every `ray.init` (Ray's post-init hooks, which Ray's own
    libraries use the same way), as long as this command runs.
    """
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield
        return

    owner = os.getpid()

    def on_sigterm(signum, frame) -> None:
        if os.getpid() != owner:  # a forked child (same process group, same handler): die as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if fired:  # a second SIGTERM while unwinding: the line is out, let the cleanup finish
            return
        fired.append(True)
        print(line, file=sys.stderr, flush=True)
        raise Terminated()

    def reinstall() -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)

    def hooks_of(worker) -> list:
        hooks = getattr(worker, "_post_init_hooks", None)
        return hooks if isinstance(hooks, list) else []

    def register(worker) -> None:
        hooks_of(worker).append(reinstall)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    # Importing ray here would read its environment before ray_session sets the loopback variable:
    # register when the command imports it.
    watcher = _after_import(_RAY_WORKER, register)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(watcher)
        if _RAY_WORKER in sys.modules:
            with contextlib.suppress(ValueError):
                hooks_of(sys.modules[_RAY_WORKER]).remove(reinstall)
        signal.signal(signal.SIGTERM, previous)


_RAY_WORKER = "ray._private.worker"


class _AfterImport:
    """A meta-path finder that calls `callback(module)` once `name` has been imported (then leaves)."""

    def __init__(self, name: str, callback: Callable) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_call(module) -> None:
                exec_module(module)
                self.callback(module)

            spec.loader.exec_module = exec_then_call
        return spec


def _after_import(name: str, callback: Callable) -> _AfterImport:
    watcher = _AfterImport(name, callback)
    if name in sys.modules:
        callback(sys.modules[name])
    else:
        sys.meta_path.insert(0, watcher)
    return watcher
