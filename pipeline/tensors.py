"""Pixels to tensors: the one uint8 -> float conversion and normalisation every stage uses.

Kept apart from ``pipeline.images`` so that decoding does not import torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def pixels(img) -> torch.Tensor:
    """PIL RGB -> uint8 ``[3, H, W]`` (a quarter of float32's bytes between processes)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (any shape) -> float32 in [0, 1]; on the tensor's device."""
    return images.float().div_(255.0)


def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float32 ``[3, H, W]`` in [0, 1]."""
    return unit_float(pixels(img))


def normalize(images: torch.Tensor, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``(x / 255 - mean) / std``; done in the step, on its device."""
    x = unit_float(images)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


__all__ = ["normalize", "pixels", "to_tensor", "unit_float"]
