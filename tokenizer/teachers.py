"""Teachers whose per-patch features the VQ-KD decoder learns to reconstruct.

* ``hog`` (default): histograms of oriented gradients per patch, as MaskFeat uses — no weights,
  works offline. Each patch is split into ``cell``×``cell`` pixel cells; each cell gets a
  ``bins``-bin histogram of unsigned gradient orientation (Sobel gradients, each magnitude split
  linearly between the two nearest bins) of the luminance, or of each RGB channel with
  ``gray=False``; each cell's histogram is divided by its l2 norm, but by no less than ``floor``;
  a patch's feature is its cells' histograms concatenated.
* ``timm:<model_name>``: any timm model with a local safetensors weights file (CLIP, DINO, ...);
  its patch features (prefix tokens dropped, pooled to the token grid) are the target.

Every teacher maps images ``[B, 3, S, S]`` in [0, 1] to ``[B, grid*grid, dim]`` and has ``dim``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError


class HOGTeacher(nn.Module):
    """``gray``: histograms of luminance gradients, so a token describes form, not colour (RGB
    histograms also encode which channels an edge separates). ``floor``: without it, a flat cell's
    pixel noise is normalised up to a full-strength random histogram, an unpredictable target; with
    it, flat cells stay near zero (images in [0, 1]; a step edge of contrast 0.3 is well above it)."""

    def __init__(self, grid: int, input_size: int, bins: int = 9, cell: int | None = None, gray: bool = True,
                 floor: float = 0.1):
        super().__init__()
        patch = input_size // grid
        cell = cell or max(1, patch // 2)
        if patch % cell:
            raise ConfigError(f"hog_cell ({cell}) must divide the patch size ({patch} = input_size / grid)")
        self.grid, self.patch, self.cell, self.bins = grid, patch, cell, bins
        self.cells_per_side = patch // cell
        self.gray, self.floor = gray, floor
        self.channels = 1 if gray else 3
        self.dim = self.channels * bins * self.cells_per_side**2

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.gray:
            x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        # Sobel filters as shifted differences (a depthwise conv is slow on CPU).
        dx = x[..., :, :-2] - x[..., :, 2:]  # [1, 0, -1] along x
        gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
        dy = x[..., :-2, :] - x[..., 2:, :]  # [1, 0, -1] along y
        gy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]
        magnitude = torch.sqrt(gx * gx + gy * gy)
        phase = torch.atan2(gx, gy)  # [-pi, pi]; mod bins below makes it unsigned (0..pi)
        # Soft binning: each gradient's magnitude is split linearly between the two nearest bin
        # centres (as Dalal & Triggs), so the target is a continuous function of the pixels.
        position = phase / math.pi * self.bins - 0.5
        lower = torch.floor(position)
        upper_weight = position - lower
        lower = lower.long().remainder(self.bins)
        upper = (lower + 1).remainder(self.bins)
        b, c, h, w = magnitude.shape
        # Sum magnitudes into (channel, bin, cell) directly: avoids a [B, 3, bins, H, W] tensor.
        cells_y, cells_x = h // self.cell, w // self.cell
        ys = torch.arange(h, device=images.device) // self.cell
        xs = torch.arange(w, device=images.device) // self.cell
        cell_index = ys[:, None] * cells_x + xs[None, :]  # [H, W]
        hist = torch.zeros(b * c, self.bins * cells_y * cells_x, device=images.device, dtype=magnitude.dtype)
        for which, weight in ((lower, 1.0 - upper_weight), (upper, upper_weight)):
            target = which * (cells_y * cells_x) + cell_index  # [B, 3, H, W] in [0, bins * cells)
            hist.scatter_add_(1, target.reshape(b * c, -1), (magnitude * weight).reshape(b * c, -1))
        hist = hist.view(b, c * self.bins, cells_y, cells_x) / (self.cell * self.cell)  # [B, c*bins, H/c, W/c]
        hist = hist / hist.norm(dim=1, keepdim=True).clamp_min(max(self.floor, 1e-6))
        g, r = self.grid, self.cells_per_side
        hist = hist.view(b, c * self.bins, g, r, g, r).permute(0, 2, 4, 3, 5, 1)  # B, gy, gx, ry, rx, ch
        return hist.reshape(b, g * g, self.dim)


class TimmTeacher(nn.Module):
    def __init__(self, name: str, weights: str | None, grid: int, kwargs: dict[str, Any] | None = None):
        super().__init__()
        import timm
        from safetensors.torch import load_file

        if not weights:
            raise ConfigError(
                f"teacher 'timm:{name}' needs teacher_weights: a local .safetensors file (no downloads are made)"
            )
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher_weights file not found: {path}")
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **(kwargs or {}))
        except Exception as e:  # unknown model name or bad kwargs
            raise ConfigError(f"teacher 'timm:{name}': cannot build the timm model ({e})") from None
        try:
            state = load_file(str(path))
        except Exception as e:
            raise ConfigError(f"teacher_weights {path}: not a readable safetensors file ({e})") from None
        for prefix in ("module.", "model.", "visual.trunk."):
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(("head", "fc.", "classifier"))]
        if missing:
            raise ConfigError(
                f"teacher_weights {path} do not fit timm model {name!r}: missing {missing[:5]}"
                + (" ..." if len(missing) > 5 else "")
            )
        model.eval().requires_grad_(False)
        self.model = model
        self.grid = grid
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        size = (kwargs or {}).get("img_size") or pcfg.get("input_size", (3, 224, 224))[-1]
        self.input_size = int(size if isinstance(size, int) else size[-1])
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
        self.dim = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim"))

    def train(self, mode: bool = True):  # the teacher is frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        feats = self.model.forward_features(x)
        if feats.ndim == 3:  # tokens: drop [CLS]/registers, back to a square map
            feats = feats[:, self.num_prefix :]
            side = math.isqrt(feats.shape[1])
            if side * side != feats.shape[1]:
                raise ValueError(f"teacher gives {feats.shape[1]} patch tokens: not a square grid")
            feats = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side)
        if feats.shape[-1] != self.grid:
            feats = F.adaptive_avg_pool2d(feats, self.grid)
        return feats.flatten(2).transpose(1, 2).float()


def standardize(features: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-dimension standardisation over all patches of the batch.

    HOG histograms are non-negative, so every target shares a large common direction and a cosine
    loss on raw targets rewards predicting the mean (training stalls there). Standardised targets
    leave only what distinguishes one patch from another.
    """
    flat = features.reshape(-1, features.shape[-1]).float()
    mean, std = flat.mean(0), flat.std(0)
    return (features - mean) / (std + eps)


def build_teacher(
    spec: str,
    *,
    grid: int,
    input_size: int,
    weights: str | None = None,
    kwargs: dict[str, Any] | None = None,
    hog_bins: int = 9,
    hog_cell: int | None = None,
    hog_gray: bool = True,
    hog_floor: float = 0.1,
) -> nn.Module:
    spec = (spec or "hog").strip()
    if spec == "hog":
        if hog_floor < 0:
            raise ConfigError(f"hog_floor must be >= 0, got {hog_floor}")
        return HOGTeacher(grid, input_size, bins=hog_bins, cell=hog_cell, gray=hog_gray, floor=hog_floor)
    if spec.startswith("timm:") and len(spec) > 5:
        return TimmTeacher(spec[5:], weights, grid, kwargs)
    raise ConfigError(f"teacher must be 'hog' or 'timm:<model_name>', got {spec!r}")
