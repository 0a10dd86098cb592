"""Errors a user can act on. Every entry point prints them as one line (exit code 2), no traceback.

A leaf module: any layer may raise them without importing the layer that catches them.
"""

from __future__ import annotations


class StageError(Exception):
    """A stage cannot go on; the message says what is wrong and what to do."""


class ConfigError(ValueError):
    """A recipe or override that does not fit the stage's config."""


class SourceError(ValueError):
    """A data source spec that cannot be opened or read."""


class CacheError(RuntimeError):
    """A token cache that is missing, incomplete, stale or corrupt."""


USER_ERRORS = (StageError, ConfigError, SourceError, CacheError, OSError)
