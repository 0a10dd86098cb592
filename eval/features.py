"""Frozen-encoder features for kNN and the linear probe, computed once and cached.

An *encoder* is a timm ``Beit`` (``num_classes=0``) plus its export config (``img_size``, ``mean``,
``std``...). Images are the centre view of each sample (``pipeline.views``) rendered at the encoder's
``img_size`` and normalised with its mean/std, so evaluation sees exactly what pretraining's V=1
views saw. Features are one vector per image:

* ``pooling="cls"``: the [CLS] token; ``pooling="mean"``: the mean of the patch tokens (through
  ``fc_norm`` when the model has one, as timm's ``avg`` head does);
* ``layer=None``: the last block (after the model's final norm); ``layer=i``: the output of block
  ``i`` (0-based, negative counts from the end), taken with ``forward_intermediates``.

The cache is keyed by (encoder id, source spec + fingerprint, pooling, layer): a directory holding
``features.npy`` (float32 ``[N, D]``), ``index.parquet`` (key, label) and ``meta.json``, which is
written last, so a directory without it is incomplete and recomputed. Local paths or URIs. The
entries are written by ``eval.feature_job`` (Ray actors over source partitions, per-partition parts
while in progress).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.eval_config import EvalError
from pipeline import storage

POOLINGS = ("cls", "mean")
CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------- encoders


@dataclass
class Encoder:
    model: torch.nn.Module  # timm Beit, num_classes=0, eval mode
    config: dict[str, Any]  # the export config: architecture, timm_kwargs, img_size, mean, std, ...
    encoder_id: str  # short sha256 over the weights and the canonical config
    name: str = "pretrained"  # "pretrained" | "random": the row of the results table
    location: str = ""

    @property
    def img_size(self) -> int:
        size = self.config.get("img_size") or self.config["timm_kwargs"].get("img_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.config.get("mean", (0.5, 0.5, 0.5)))  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.config.get("std", (0.5, 0.5, 0.5)))  # type: ignore[return-value]

    @property
    def depth(self) -> int:
        return len(self.model.blocks)


def _config_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    import dataclasses

    return dataclasses.asdict(cfg)


def _canonical(cfg: dict[str, Any]) -> str:
    keep = {k: cfg.get(k) for k in ("architecture", "timm_kwargs", "img_size", "patch_size", "mean", "std")}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"), default=str)


def encoder_id(model: torch.nn.Module, cfg: dict[str, Any]) -> str:
    """Same weights + same config => same id (short sha256)."""
    h = hashlib.sha256(_canonical(cfg).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_encoder(location: str | Path) -> Encoder:
    """An exported encoder directory or a pretraining checkpoint (``pretrain.export.load_encoder``)."""
    from pretrain.export import load_encoder as _load

    location = str(location)
    if not storage.exists(location):
        raise EvalError(
            f"encoder not found: {location} (export one with `mimflow export`, or pass --encoder DIR)"
        )
    try:
        model, cfg = _load(location)
    except ValueError as e:
        raise EvalError(f"cannot load encoder {location}: {e}") from None
    cfg = _config_dict(cfg)
    model.eval()
    return Encoder(model, cfg, encoder_id(model, cfg), "pretrained", location)


def random_encoder(like: Encoder, seed: int = 0) -> Encoder:
    """The same architecture and preprocessing, randomly initialised (timm's init) with ``seed``."""
    import timm.models.beit as beit

    cfg = dict(like.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = beit.Beit(**cfg["timm_kwargs"])
    model.eval()
    cfg["source_checkpoint"] = f"random-init(seed={seed})"
    return Encoder(model, cfg, encoder_id(model, cfg), "random", f"random:{seed}")


# ----------------------------------------------------------------------------------------- images


@dataclass
class LabelledImages:
    """Centre views of a labelled source, rendered at one size: uint8 ``[N, 3, S, S]``."""

    spec: str
    pixels: np.ndarray
    labels: np.ndarray  # int64 [N]
    keys: list[str]
    classes: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # key, origin, reason

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, mask_or_index: np.ndarray) -> "LabelledImages":
        idx = np.flatnonzero(mask_or_index) if mask_or_index.dtype == bool else mask_or_index
        return LabelledImages(
            self.spec, self.pixels[idx], self.labels[idx], [self.keys[i] for i in idx], self.classes, self.skipped
        )


def open_labelled(spec: str):
    """Open ``spec`` and refuse it, with the reason, unless its samples carry labels."""
    from pipeline.sources import open_source

    source = open_source(spec)
    if not source.labelled or not source.classes:
        raise EvalError(
            f"source {spec!r} has no labels, and evaluation needs them: give a folder with one "
            "subfolder per class, WebDataset tars with a .cls member, IDX images with their labels "
            "file, or shapes"
        )
    return source


def decode_partition(source, part, size: int) -> LabelledImages:
    """Centre views at ``size`` of one partition's labelled samples (``source.iter_partition``).

    The one decoder of evaluation images: feature workers call it per partition, and
    ``load_labelled_images`` over every partition. Bad or unlabelled items are listed, not dropped silently.
    """
    from pipeline.images import BadImageError, decode_rgb
    from pipeline.sources import BadInput
    from pipeline.views import centre_view, render_view

    pixels: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    skipped: list[dict[str, str]] = []
    for item in source.iter_partition(part):
        if isinstance(item, BadInput):
            skipped.append({"key": item.key, "origin": item.origin, "reason": item.reason})
            continue
        if item.label is None:
            skipped.append({"key": item.key, "origin": item.origin, "reason": "no label"})
            continue
        try:
            img = decode_rgb(item.data)
        except BadImageError as e:
            skipped.append({"key": item.key, "origin": item.origin, "reason": e.reason})
            continue
        view = render_view(img, centre_view(img.width, img.height), size)
        pixels.append(np.asarray(view, dtype=np.uint8).transpose(2, 0, 1))
        labels.append(int(item.label))
        keys.append(item.key)
    return LabelledImages(
        source.spec,
        np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.uint8),
        np.asarray(labels, dtype=np.int64),
        keys,
        list(source.classes or []),
        skipped,
    )


def load_labelled_images(spec: str, size: int) -> LabelledImages:
    """Every labelled sample's centre view at ``size``, in memory (small sources: tests, the benchmark's reference).

    Evaluation never calls this: features are computed partition by partition (``eval.feature_job``)
    and fine-tuning streams its keys (``eval.stream``), so the driver holds no images.
    """
    source = open_labelled(spec)
    parts = [decode_partition(source, part, size) for part in source.partitions()]
    keys = [k for p in parts for k in p.keys]
    skipped = [s for p in parts for s in p.skipped]
    if not keys:
        raise EvalError(f"source {spec!r} has no readable labelled images ({len(skipped)} skipped)")
    order = listing_order(source, keys)
    return LabelledImages(
        spec,
        np.concatenate([p.pixels for p in parts])[order],
        np.concatenate([p.labels for p in parts])[order],
        [keys[i] for i in order],
        list(source.classes or []),
        skipped,
    )


def listing_order(source, keys: list[str]) -> np.ndarray:
    """The permutation that puts items gathered partition by partition (partitions group items by a
    hash of their key) back in the source's listing order."""
    position = {key: i for i, key in enumerate(source.keys())}
    return np.argsort([position[k] for k in keys], kind="stable")


def normalise(pixels: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32, ``(x/255 - mean) / std``."""
    x = torch.as_tensor(pixels).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------------------- features


@dataclass
class FeatureSet:
    features: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N]
    keys: list[str]
    classes: list[str]
    cached: bool  # True when read from the cache
    path: str  # the cache entry
    seconds: float = 0.0
    skipped: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # extraction: actors, start-up and extract seconds

    def subset(self, mask: np.ndarray) -> "FeatureSet":
        idx = np.flatnonzero(mask)
        return FeatureSet(
            self.features[idx], self.labels[idx], [self.keys[i] for i in idx], self.classes,
            self.cached, self.path, self.seconds, self.skipped, self.stats,
        )


def pool_tokens(model: torch.nn.Module, tokens: torch.Tensor, pooling: str, final: bool) -> torch.Tensor:
    """``tokens`` = [B, prefix + patches, D] -> [B, D]."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if pooling == "cls":
        return tokens[:, 0]
    pooled = tokens[:, prefix:].mean(dim=1)
    if final and getattr(model, "fc_norm", None) is not None:
        pooled = model.fc_norm(pooled)  # Identity unless the model pools with fc_norm (timm "avg")
    return pooled


@torch.no_grad()
def compute_features(
    encoder: Encoder,
    pixels: np.ndarray,
    *,
    pooling: str = "mean",
    layer: int | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Features of uint8 images ``[N, 3, S, S]`` (already at the encoder's size), batched, no grad."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    model = encoder.model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval().to(device)
    depth = encoder.depth
    block = None
    if layer is not None:
        block = layer + depth if layer < 0 else layer
        if not 0 <= block < depth:
            raise EvalError(f"layer {layer} is out of range for an encoder of depth {depth}")
    out = []
    for start in range(0, len(pixels), batch_size):
        x = normalise(pixels[start : start + batch_size], encoder.mean, encoder.std).to(device)
        if block is None:
            tokens = model.forward_features(x)
            out.append(pool_tokens(model, tokens, pooling, final=True).float().cpu())
        else:
            patches, prefix = model.forward_intermediates(
                x, indices=[block], return_prefix_tokens=True, norm=False, output_fmt="NLC",
                intermediates_only=True,
            )[0]
            tokens = torch.cat([prefix, patches], dim=1)
            out.append(pool_tokens(model, tokens, pooling, final=False).float().cpu())
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def cache_entry(cache_dir: str, encoder: Encoder, spec: str, fingerprint: str, pooling: str, layer: int | None) -> str:
    source_id = hashlib.sha256(f"{spec}\n{fingerprint}".encode()).hexdigest()[:16]
    return storage.join(cache_dir, encoder.encoder_id, f"{source_id}-{pooling}-{'last' if layer is None else layer}")


def write_entry(entry: str, fs: FeatureSet, meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    np.save(buf, fs.features)
    storage.write_bytes_atomic(storage.join(entry, "features.npy"), buf.getvalue())
    table = pa.table({"key": fs.keys, "label": fs.labels})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(storage.join(entry, "index.parquet"), sink.getvalue())
    storage.write_bytes_atomic(storage.join(entry, "meta.json"), json.dumps(meta, indent=1).encode())


def read_entry(entry: str) -> FeatureSet | None:
    from pipeline.token_cache import read_parquet

    meta_path = storage.join(entry, "meta.json")
    if not storage.exists(meta_path):
        return None
    meta = json.loads(storage.read_bytes(meta_path))
    if meta.get("format") != CACHE_FORMAT:
        return None
    features = np.load(io.BytesIO(storage.read_bytes(storage.join(entry, "features.npy"))))
    table = read_parquet(storage.join(entry, "index.parquet"))
    labels = table.column("label").to_numpy().astype(np.int64)
    keys = table.column("key").to_pylist()
    if len(keys) != len(features):
        return None
    return FeatureSet(features, labels, keys, meta["classes"], True, entry, 0.0, int(meta.get("skipped", 0)))
