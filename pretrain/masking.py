"""Which patches a pretraining step hides: BEiT's blockwise masking, or uniform random masking.

Both generators return a boolean ``[h, w]`` array with **exactly** ``num_masked`` True entries.

Blockwise masking follows BEiT (Bao et al., 2021, Algorithm 1): repeatedly draw a block whose area is
uniform in ``[min_block, remaining]`` (capped by ``max_block``) and whose aspect ratio is log-uniform
in ``[min_aspect, 1/min_aspect]``, place it at a uniform position, and keep it if it adds at least one
new patch without overshooting the budget; up to ``max_tries`` draws per block. The reference loop
stops early when no block fits, leaving fewer masked patches than asked; here the remainder is topped
up with random unmasked patches (and, defensively, any excess trimmed at random), so every image in a
batch has the same count and the loss is averaged over the same number of positions.

Masks are drawn in the data loader workers (see ``pretrain.data``), from a ``numpy`` Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Block:
    top: int
    left: int
    height: int
    width: int


class BlockMasking:
    """BEiT blockwise masking with an exact masked-patch count."""

    def __init__(
        self,
        grid: tuple[int, int],
        num_masked: int,
        *,
        min_block: int = 16,
        max_block: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_tries: int = 10,
    ):
        self.height, self.width = grid
        total = self.height * self.width
        if not 0 <= num_masked <= total:
            raise ValueError(f"num_masked must be in [0, {total}] for a {grid} grid, got {num_masked}")
        if min_block < 1:
            raise ValueError(f"min_block must be >= 1, got {min_block}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.num_masked = num_masked
        self.min_block = min_block
        self.max_block = num_masked if max_block is None else max_block
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_tries = max_tries

    def __repr__(self) -> str:
        return (
            f"BlockMasking(grid=({self.height}, {self.width}), num_masked={self.num_masked}, "
            f"min_block={self.min_block}, max_block={self.max_block}, "
            f"aspect=({math.exp(self.log_aspect[0]):.3g}, {math.exp(self.log_aspect[1]):.3g}))"
        )

    def _place(self, rng: np.random.Generator, mask: np.ndarray, budget: int, blocks: list[Block] | None) -> int:
        """Try up to ``max_tries`` blocks; return how many new patches the first useful one added."""
        for _ in range(self.max_tries):
            # as the reference: uniform in [min_block, budget], or [budget, min_block] near the end
            # (such a block must then mostly overlap masked patches to fit the budget)
            area = rng.uniform(min(self.min_block, budget), max(self.min_block, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                if blocks is not None:
                    blocks.append(Block(top, left, h, w))
                return added
        return 0

    def __call__(self, rng: np.random.Generator, blocks: list[Block] | None = None) -> np.ndarray:
        """A bool ``[h, w]`` mask with exactly ``num_masked`` True; placed blocks go to ``blocks``."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            budget = min(self.num_masked - count, self.max_block)
            added = self._place(rng, mask, budget, blocks)
            if added == 0:
                break
            count += added
        return _exact(rng, mask, self.num_masked)


class RandomMasking:
    """Uniform random masking (as MAE / SimMIM use): exactly ``num_masked`` patches."""

    def __init__(self, grid: tuple[int, int], num_masked: int):
        self.height, self.width = grid
        if not 0 <= num_masked <= self.height * self.width:
            raise ValueError(f"num_masked must be in [0, {self.height * self.width}], got {num_masked}")
        self.num_masked = num_masked

    def __repr__(self) -> str:
        return f"RandomMasking(grid=({self.height}, {self.width}), num_masked={self.num_masked})"

    def __call__(self, rng: np.random.Generator, blocks: list[Block] | None = None) -> np.ndarray:
        flat = np.zeros(self.height * self.width, dtype=bool)
        flat[rng.choice(flat.size, self.num_masked, replace=False)] = True
        return flat.reshape(self.height, self.width)


def _exact(rng: np.random.Generator, mask: np.ndarray, num_masked: int) -> np.ndarray:
    """Top up with random unmasked patches, or trim random masked ones, to exactly ``num_masked``."""
    flat = mask.reshape(-1)
    count = int(flat.sum())
    if count < num_masked:
        free = np.flatnonzero(~flat)
        flat[rng.choice(free, num_masked - count, replace=False)] = True
    elif count > num_masked:
        taken = np.flatnonzero(flat)
        flat[rng.choice(taken, count - num_masked, replace=False)] = False
    return mask


def num_masked_for(grid: tuple[int, int], ratio: float | None, num_masked: int | None) -> int:
    """``num_masked`` when given, else ``round(ratio * h * w)``."""
    total = grid[0] * grid[1]
    if num_masked is not None:
        if not 0 < num_masked < total:
            raise ValueError(f"mask.num_masked must be in (0, {total}) for a {grid[0]}x{grid[1]} grid, got {num_masked}")
        return num_masked
    if ratio is None or not 0 < ratio < 1:
        raise ValueError(f"mask.ratio must be in (0, 1), got {ratio}")
    return max(1, min(total - 1, int(round(ratio * total))))


def make_masker(mode: str, grid: tuple[int, int], num_masked: int, *, min_block: int = 16,
                max_block: int | None = None, min_aspect: float = 0.3):
    if mode == "block":
        return BlockMasking(grid, num_masked, min_block=min_block, max_block=max_block, min_aspect=min_aspect)
    if mode == "random":
        return RandomMasking(grid, num_masked)
    raise ValueError(f"mask.mode must be 'block' or 'random', got {mode!r}")


__all__ = ["Block", "BlockMasking", "RandomMasking", "make_masker", "num_masked_for"]
