"""Export the pretrained encoder for timm, and load it back.

``<dir>/model.safetensors``  the encoder's ``state_dict`` (a ``timm.models.beit.Beit``, ``num_classes=0``)
``<dir>/config.json``        ``{"architecture": "beit", "timm_kwargs": {...}, "img_size", "patch_size",
                               "mean", "std", "source_checkpoint", ...}``

Loading it needs nothing from mimflow::

    import json, timm.models.beit as beit, safetensors.torch as st
    cfg = json.load(open("encoder/config.json"))
    model = beit.Beit(**cfg["timm_kwargs"]); model.load_state_dict(st.load_file("encoder/model.safetensors"), strict=True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from pipeline import storage
from pretrain.checkpoint import MODEL, latest_checkpoint, read_state

EXPORT_FORMAT = 1
PREFIX = "encoder."


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of a MIM model state, renamed to the timm Beit's own keys."""
    out = {k[len(PREFIX):]: v.contiguous() for k, v in model_state.items() if k.startswith(PREFIX)}
    if not out:
        raise ValueError("no encoder.* weights in this model state")
    return out


def export_config(state: dict[str, Any], source: str) -> dict[str, Any]:
    enc = state["encoder"]
    return {
        "architecture": "beit",
        "format": EXPORT_FORMAT,
        "timm_kwargs": enc["timm_kwargs"],
        "img_size": enc["img_size"],
        "patch_size": enc["patch_size"],
        "mean": enc["mean"],
        "std": enc["std"],
        "source_checkpoint": source,
        "step": state.get("step"),
        "target": state.get("target"),
        "tokenizer_id": state.get("tokenizer_id"),
        "vocab_size": state.get("vocab_size"),
    }


def export_encoder(checkpoint: str | Path, out: str, source: str | None = None) -> str:
    """Write ``model.safetensors`` + ``config.json`` for timm; ``checkpoint`` may be a run directory.
    ``source``: where the checkpoint lives, recorded in the config (default: its resolved local path;
    given when ``checkpoint`` is a local copy of a checkpoint in a bucket)."""
    ckpt = latest_checkpoint(checkpoint)
    state = read_state(ckpt)
    weights = encoder_state(load(storage.read_bytes(storage.join(ckpt, MODEL))))
    cfg = export_config(state, source or storage.absolute(ckpt))
    _check_loads(weights, cfg)
    storage.makedirs(out)
    storage.write_bytes_atomic(storage.join(out, "model.safetensors"), save(weights, metadata={"format": "pt"}))
    storage.write_bytes_atomic(storage.join(out, "config.json"), json.dumps(cfg, indent=1).encode())
    return out


def _check_loads(weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    from timm.models.beit import Beit

    with torch.device("meta"):
        model = Beit(**cfg["timm_kwargs"])
    model.load_state_dict(weights, strict=True, assign=True)  # raises on any missing/extra key or shape


def load_encoder(location: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(timm Beit in eval mode, export config)`` from an exported directory or a pretraining checkpoint."""
    from timm.models.beit import Beit

    location = str(location)
    cfg_path = storage.join(location, "config.json")
    if storage.exists(cfg_path) and storage.exists(storage.join(location, "model.safetensors")):
        cfg = json.loads(storage.read_bytes(cfg_path))
        if cfg.get("architecture") != "beit":
            raise ValueError(f"{location}: config.json is not a mimflow encoder export (architecture "
                             f"{cfg.get('architecture')!r})")
        weights = load(storage.read_bytes(storage.join(location, "model.safetensors")))
    else:
        ckpt = latest_checkpoint(location)
        state = read_state(ckpt)
        cfg = export_config(state, storage.absolute(ckpt))
        weights = encoder_state(load(storage.read_bytes(storage.join(ckpt, MODEL))))
    model = Beit(**cfg["timm_kwargs"])
    model.load_state_dict(weights, strict=True)
    model.eval()
    return model, cfg


__all__ = ["export_config", "export_encoder", "encoder_state", "load_encoder"]
