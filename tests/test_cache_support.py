"""Helpers shared by the token-cache tests (no tests here): a tiny random tokenizer, cache readers."""

from __future__ import annotations

from pathlib import Path

from pipeline.token_cache import CacheSample, check_cache, decode_sample, read_manifest, read_shard, shard_urls


def make_tokenizer(path: Path, seed: int = 0) -> str:
    """A tiny dVAE with random weights, saved as a checkpoint directory; returns its path."""
    import torch

    from tokenizer.base import TokenizerConfig
    from tokenizer.checkpoint import build_tokenizer, save_tokenizer

    torch.manual_seed(seed)
    cfg = TokenizerConfig(kind="dvae", vocab_size=64, grid=4, input_size=16, width=8, depth=1, code_dim=8)
    save_tokenizer(build_tokenizer(cfg), path)
    return str(path)


def read_cache(cache_dir: str) -> list[CacheSample]:
    _, rows = check_cache(cache_dir)
    return [decode_sample(raw) for url in shard_urls(cache_dir, rows) for raw in read_shard(url)]


def manifest_without_time(cache_dir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "created"} for r in read_manifest(cache_dir)]
