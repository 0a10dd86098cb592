"""What ``ray job submit --working-dir`` uploads: the default excludes and a size estimate, computed
with the same rules as Ray (excludes + ``.gitignore``/``.rayignore`` at every level)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

# gitignore syntax, relative to the working dir (Ray also honours .gitignore and .rayignore files).
DEFAULT_EXCLUDES: list[str] = [
    # version control, environments, caches
    ".git", ".hg", ".venv", "venv", ".tox", ".nox", "**/__pycache__", "*.pyc", "*.egg-info",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints", "/build", "/dist",
    "/.whl", "/.gl",
    # data and outputs: these live on shared storage, never in the upload
    "/data", "/datasets", "/runs", "/demo-out", "/bench/results", "/tokens", "/checkpoints",
    "/outputs", "/wandb", "/mlruns", "/lightning_logs",
    # secrets: never uploaded (they would sit in the GCS and on every worker's disk)
    ".env", ".env.*", ".envrc", "*.pem", "*.key", "auth_token", "*.token", ".netrc", ".aws",
    ".ssh", ".ray", ".mimflow", "*kubeconfig*",
]
UPLOAD_LIMIT_MIB = 100  # Ray refuses working_dir packages at this size


@dataclass
class UploadEstimate:
    files: int = 0
    bytes: int = 0
    largest: list[tuple[int, str]] = field(default_factory=list)  # (bytes, relative path), top 5

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def estimate_upload(working_dir: Path, excludes: Sequence[str]) -> UploadEstimate | None:
    """What `ray job submit --working-dir` would upload; None if Ray's matcher is unavailable."""
    try:
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:  # pragma: no cover - Ray moved it; Ray itself still enforces the limit
        return None
    root = working_dir.resolve()
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    base = PathSpec.from_lines("gitwildmatch", list(excludes))
    est = UploadEstimate()
    sizes: list[tuple[int, str]] = []

    def walk(d: Path, specs: list[tuple[Path, object]]) -> None:
        specs = list(specs)
        for name in ((".gitignore",) if include_gitignore else ()) + (".rayignore",):
            f = d / name
            if f.is_file():
                specs.append((d, PathSpec.from_lines("gitwildmatch", f.read_text(errors="replace").splitlines())))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            p = Path(e.path)
            if any(spec.match_file(str(p.relative_to(sd))) for sd, spec in specs):
                continue
            if e.is_dir(follow_symlinks=False):
                walk(p, specs)
            elif e.is_file(follow_symlinks=False):
                size = e.stat(follow_symlinks=False).st_size
                est.files += 1
                est.bytes += size
                sizes.append((size, str(p.relative_to(root))))

    walk(root, [(root, base)])
    est.largest = sorted(sizes, reverse=True)[:5]
    return est
