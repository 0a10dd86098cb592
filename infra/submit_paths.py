"""Warnings for data paths a submitted job would resolve against its private copy of the working dir.

A job runs from an uploaded copy, so a relative ``--source``/``--out``/... (or such a ``--set`` key or
config key) would read and write inside that copy. These checks only warn; they never rewrite.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

# Flags and config keys whose values are data locations the job reads or writes.
PATH_FLAGS = {
    "--source", "--out", "--output", "--tokens", "--tokenizer", "--encoder", "--checkpoint",
    "--storage-path", "--data", "--resume", "--run-dir", "--cache", "--images", "--train", "--test",
    "--compare",
}
PATH_KEYS = {
    "source", "out", "output", "tokens", "tokenizer", "encoder", "checkpoint", "storage_path",
    "data", "root", "dir", "path", "cache", "images", "resume",
}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BUILTIN_SOURCES = ("shapes",)


def _is_path_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1].lower().replace("-", "_")
    return last in PATH_KEYS or last.endswith(("_dir", "_path", "_root", "_uri", "_file"))


def is_local_relative(value: str) -> bool:
    """True for a value the job would resolve against its private copy of the working dir."""
    v = value.strip()
    if not v or _URI.match(v) or v.startswith(_BUILTIN_SOURCES):
        return False
    if v.startswith("idx:"):
        v = v[4:]
    v = v.split("?", 1)[0]
    if not v:
        return False
    return not v.startswith("/")  # relative, or ~ (the cluster's home is not yours)


def relative_path_warnings(args: Sequence[str], cwd: Path | None = None) -> list[str]:
    """Warnings for data-location arguments that are relative local paths (the caller must make them
    absolute or URIs; this never rewrites them). Looks at --source/--out/... flags, --set key=value with
    a path-like key, and path-like keys inside a local --config YAML."""
    out: list[str] = []

    def check(what: str, value: str) -> None:
        if is_local_relative(value):
            shown = f"{what}{value!r}" if what.endswith("=") else f"{what} {value!r}"
            out.append(
                f"{shown} is a relative path: the job runs from an uploaded copy of the working "
                f"dir on the cluster, so it would read/write inside that copy (lost when the job ends, "
                f"and not seen by other nodes). Pass an absolute path on shared storage or a URI (s3://...)."
            )

    args = list(args)
    i = 0
    while i < len(args):
        a = args[i]
        flag, eq, val = a.partition("=")
        if flag in PATH_FLAGS:
            if eq:
                check(flag, val)
            elif i + 1 < len(args):
                check(flag, args[i + 1])
                i += 1
        elif flag == "--set":
            kv = val if eq else (args[i + 1] if i + 1 < len(args) else "")
            if not eq:
                i += 1
            key, _, value = kv.partition("=")
            if _is_path_key(key):
                check(f"--set {key}=", value)
        elif flag == "--config":
            cfg = val if eq else (args[i + 1] if i + 1 < len(args) else "")
            if not eq:
                i += 1
            for key, value in _config_paths(cfg, cwd):
                check(f"{cfg}: {key}=", value)
        i += 1
    return out


def _config_paths(cfg: str, cwd: Path | None) -> list[tuple[str, str]]:
    if not cfg.endswith((".yaml", ".yml")):
        return []
    path = Path(cfg) if Path(cfg).is_absolute() else (cwd or Path.cwd()) / cfg
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception:  # unreadable or not ours to judge: the stage reports config errors itself
        return []
    found: list[tuple[str, str]] = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, str) and _is_path_key(prefix):
            found.append((prefix, node))

    walk(data, "")
    return found
