"""Stage 1 of the design card as one job: train the tokenizer (unless current), then build its cache.

The config is the tokenizer's training config plus a ``tokens`` section::

    tokenizer: {...}          # tokenizer.train_config.TokenizerTrainConfig
    tokens: {out: ..., views: 1, batch_size: 64, actors: null, seed: 0, source: null}

A recipe that is a plain tokenizer-training recipe (no ``tokenizer``/``tokens`` keys) is read as the
``tokenizer`` section, with default ``tokens``; ``--set`` keys not starting with ``tokenizer.`` or
``tokens.`` address the tokenizer section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.config import ConfigError, apply_overrides, from_dict, resolve_recipe
from tokenizer.train_config import TokenizerTrainConfig

SECTIONS = ("tokenizer", "tokens")


@dataclass
class TokensConfig:
    out: str = "out/tokens"  # cache root: the cache is out/<tokenizer_id>/
    source: str | None = None  # default: the source the tokenizer is trained on
    views: int = 1
    batch_size: int = 64
    actors: int | None = None  # default: one per GPU, else one per CPU
    seed: int = 0

    def __post_init__(self):
        if self.views < 1:
            raise ValueError(f"tokens.views must be >= 1, got {self.views}")
        if self.batch_size < 1:
            raise ValueError(f"tokens.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Stage1Config:
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)


def load_stage1_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> Stage1Config:
    data: dict[str, Any] = {}
    where = "defaults"
    if recipe is not None:
        path = resolve_recipe(recipe, TokenizerTrainConfig.RECIPES)
        where = str(path)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping, got {type(loaded).__name__}")
        data = loaded if loaded and set(loaded) <= set(SECTIONS) else {"tokenizer": loaded}
    routed = [o if o.split("=", 1)[0].split(".", 1)[0] in SECTIONS else f"tokenizer.{o}" for o in overrides]
    data = apply_overrides(data, routed)
    try:
        return from_dict(Stage1Config, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def run_stage1(cfg: Stage1Config, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Train (or reuse) the tokenizer, then build (or resume, or confirm) its token cache."""
    from pipeline.ray_context import ray_session
    from tokenizer.precompute import build_cache
    from tokenizer.train import train_tokenizer

    source = cfg.tokens.source or cfg.tokenizer.source
    if not source:
        raise ConfigError("tokens.source is not set and the tokenizer config names no source")
    with ray_session(address, num_cpus):
        tok_dir = str(train_tokenizer(cfg.tokenizer, address=address))
        report = build_cache(
            tok_dir,
            source,
            cfg.tokens.out,
            cfg.tokens.views,
            batch_size=cfg.tokens.batch_size,
            num_actors=cfg.tokens.actors,
            seed=cfg.tokens.seed,
            address=address,
        )
    return {
        "tokenizer": tok_dir,
        "tokenizer_id": report.tokenizer_id,
        "cache": report.cache_dir,
        "samples": report.samples,
        "errors": report.errors,
        "encoded_shards": report.encoded,
        "kept_shards": report.reused,
        "up_to_date": report.up_to_date,
    }


