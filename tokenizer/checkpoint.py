"""Tokenizer checkpoints: build a tokenizer from its config, save and load its directory, ``tokenizer_id``.

The directory (``config.json`` + ``model.safetensors``) is the contract described in ``tokenizer.base``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import ConfigError
from tokenizer.base import (CONFIG_FILE, WEIGHTS_FILE, Tokenizer, TokenizerConfig, TokenizerLoadError,
                            compute_tokenizer_id, config_to_dict)
from tokenizer.dvae import DVAE
from tokenizer.released import build_released
from tokenizer.vqkd import VQKD


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    if config.arch != "mimflow":
        return build_released(config)
    return DVAE(config) if config.kind == "dvae" else VQKD(config)


def tokenizer_id(path: str | Path) -> str:
    """The id of a saved tokenizer (same content => same id, on any machine)."""
    config, tensors = _read_checkpoint(path)
    return compute_tokenizer_id(tensors, config)


# --- save / load --------------------------------------------------------------------------------
def save_tokenizer(tok: Tokenizer, path: str | Path) -> str:
    """Write ``config.json`` + ``model.safetensors`` (each atomically; weights first); returns the id."""
    from safetensors.torch import save

    tensors = tok.export_state_dict()
    storage.makedirs(path)
    storage.write_bytes_atomic(storage.join(path, WEIGHTS_FILE), save(tensors, metadata={"format": "pt"}))
    doc = {**config_to_dict(tok.config), "tokenizer_id": compute_tokenizer_id(tensors, tok.config)}
    storage.write_bytes_atomic(storage.join(path, CONFIG_FILE), (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return doc["tokenizer_id"]


def _read_checkpoint(path: str | Path) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    from pipeline.config import from_dict

    path = str(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    if not storage.is_dir(path):
        raise TokenizerLoadError(f"tokenizer checkpoint {path} must be a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg_path, weights_path = storage.join(path, CONFIG_FILE), storage.join(path, WEIGHTS_FILE)
    for p in (cfg_path, weights_path):
        if not storage.exists(p):
            raise FileNotFoundError(f"tokenizer checkpoint {path} is incomplete: missing {p}")
    try:
        doc = json.loads(storage.read_bytes(cfg_path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise TokenizerLoadError(f"{cfg_path}: expected a JSON object, got {type(doc).__name__}")
    doc.pop("tokenizer_id", None)  # informative only; recomputed from content
    for required in ("kind", "vocab_size", "grid", "input_size"):
        if required not in doc:
            raise TokenizerLoadError(f"{cfg_path}: missing field {required!r}")
    try:
        config = from_dict(TokenizerConfig, doc)
    except ConfigError as e:
        raise TokenizerLoadError(f"{cfg_path}: {e}") from None
    try:
        tensors = load(storage.read_bytes(weights_path))
    except Exception as e:  # safetensors raises its own error type for corrupt headers / truncation
        raise TokenizerLoadError(f"{weights_path}: corrupt or not a safetensors file ({type(e).__name__}: {e})") from None
    return config, tensors


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
    """Load a tokenizer directory; errors name the file and field that is wrong."""
    config, tensors = _read_checkpoint(path)
    weights_path = f"{path}/{WEIGHTS_FILE}"
    tok = build_tokenizer(config)
    expected = tok.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise TokenizerLoadError(
            f"{weights_path} does not match the {config.kind} config in config.json ({'; '.join(parts)}): saved from "
            f"another kind of tokenizer, or with another input_size/grid/depth?"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise TokenizerLoadError(f"{weights_path}: {_mismatch(name, tuple(got.shape), tuple(ref.shape), config)}")
    tok.load_state_dict(tensors, strict=True)
    tok.mark_loaded()
    return tok.to(map_location).eval()


def _mismatch(name: str, got: tuple, want: tuple, config: TokenizerConfig) -> str:
    n = config.grid * config.grid
    if "pos_embed" in name and n in want:
        side = math.isqrt(got[1]) if len(got) == 3 else 0
        return (
            f"tensor {name!r} has shape {list(got)} but config.json grid={config.grid} expects {list(want)} "
            f"(grid mismatch{f': weights are for grid {side}' if side * side == got[1] and side else ''})"
        )
    if config.vocab_size in want:
        return (
            f"tensor {name!r} has shape {list(got)} but config.json vocab_size={config.vocab_size} "
            f"expects {list(want)} (vocab size mismatch)"
        )
    return f"tensor {name!r} has shape {list(got)}, config.json implies {list(want)}"


Tokenizer.load = staticmethod(load_tokenizer)

__all__ = [
    "TokenizerConfig",
    "TokenizerLoadError",
    "Tokenizer",
    "build_tokenizer",
    "compute_tokenizer_id",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_id",
]
