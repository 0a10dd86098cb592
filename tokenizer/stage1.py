"""Stage 1 of the design card as one job: train the tokenizer (unless current), then build its cache.

The config is the tokenizer's training config plus a ``tokens`` section::

    tokenizer: {...}          # tokenizer.train_config.TokenizerTrainConfig
    tokens: {out: ..., views: 1, batch_size: 64, actors: null, seed: 0, source: null,
             crop_scale: [0.4, 1.0], jitter: 0.0, interp: bicubic, tok_interp: bicubic}

A recipe that is a plain tokenizer-training recipe (no ``tokenizer``/``tokens`` keys) is read as the
``tokenizer`` section, with default ``tokens``; ``--set`` keys not starting with ``tokenizer.`` or
``tokens.`` address the tokenizer section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Sequence

from pipeline.config import PATH, SOURCE, ConfigError, Range, apply_overrides, from_dict, read_yaml, resolve_recipe
from pipeline.views import ViewStyleFields
from tokenizer.train_config import TokenizerTrainConfig

SECTIONS = ("tokenizer", "tokens")


@dataclass
class TokensConfig(ViewStyleFields):  # with the view style's keys: crop_scale, jitter, interp, tok_interp
    out: Annotated[str, PATH] = "out/tokens"  # cache root: the cache is out/<tokenizer_id>/
    source: Annotated[str | None, SOURCE] = None  # default: the source the tokenizer is trained on
    views: Annotated[int, Range(ge=1)] = 1
    batch_size: Annotated[int, Range(ge=1)] = 64
    actors: Annotated[int | None, Range(ge=1)] = None  # default: one per GPU, else one per CPU
    seed: int = 0


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
        loaded = read_yaml(path) or {}
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
            style=cfg.tokens.style(),
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


