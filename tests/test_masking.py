from __future__ import annotations

import math

import numpy as np
import pytest

from pretrain.masking import BlockMasking, RandomMasking, make_masker, num_masked_for


def _components(mask: np.ndarray) -> int:
    """4-connected components of True cells."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    count = 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                count += 1
                stack = [(i, j)]
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        x, y = a + da, b + db
                        if 0 <= x < h and 0 <= y < w and mask[x, y] and not seen[x, y]:
                            seen[x, y] = True
                            stack.append((x, y))
    return count


@pytest.mark.parametrize(
    "grid,num,min_block",
    [((14, 14), 75, 16), ((8, 8), 26, 4), ((8, 8), 26, 16), ((14, 14), 176, 16), ((4, 6), 1, 16), ((7, 5), 34, 2)],
)
def test_block_masks_have_exactly_the_requested_count(grid, num, min_block):
    rng = np.random.default_rng(0)
    masker = BlockMasking(grid, num, min_block=min_block)
    for _ in range(1000):
        mask = masker(rng)
        assert mask.shape == grid and mask.dtype == bool
        assert int(mask.sum()) == num


def test_random_masks_have_exactly_the_requested_count_and_are_uniform():
    rng = np.random.default_rng(1)
    masker = RandomMasking((14, 14), 75)
    total = np.zeros((14, 14))
    for _ in range(2000):
        mask = masker(rng)
        assert int(mask.sum()) == 75
        total += mask
    freq = total / 2000
    assert abs(freq.mean() - 75 / 196) < 1e-9
    assert freq.min() > 0.30 and freq.max() < 0.47  # every patch is masked ~38% of the time


def test_block_statistics_follow_beit():
    rng = np.random.default_rng(2)
    masker = BlockMasking((14, 14), 75, min_block=16, min_aspect=0.3)
    blocks, first, components, random_components = [], [], [], []
    rand = RandomMasking((14, 14), 75)
    for _ in range(500):
        placed: list = []
        mask = masker(rng, placed)
        assert placed, "the block loop placed nothing"
        blocks += placed
        first.append(placed[0])
        components.append(_components(mask))
        random_components.append(_components(rand(rng)))
    # a block's area is drawn in [min_block, remaining budget] (in [budget, min_block] once fewer than
    # min_block patches remain, as in the reference); rounding h and w moves it by a few patches
    areas = np.array([b.height * b.width for b in first])
    assert areas.min() >= 12 and areas.max() <= 75 + 12
    assert 35 < np.median(areas) < 55  # uniform in [16, 75]
    log_aspect = np.log([b.height / b.width for b in blocks])
    # aspect log-uniform in [0.3, 1/0.3] (rounding to whole patches widens it a little), symmetric
    assert np.abs(log_aspect).max() <= math.log(1 / 0.3) + 0.45
    assert abs(log_aspect.mean()) < 0.1
    assert (log_aspect > 0.6).mean() > 0.1 and (log_aspect < -0.6).mean() > 0.1
    # blocks fit strictly inside the grid, as in the reference
    assert all(b.height < 14 and b.width < 14 for b in blocks)
    # blockwise masks are a few blobs; random masks are many scattered patches
    assert np.mean(components) < 6 < np.mean(random_components)


def test_top_up_when_the_block_loop_stops_short():
    # 8x8 with min_block 16 and a large budget: blocks are at most 7x7, the loop often stops short
    rng = np.random.default_rng(3)
    masker = BlockMasking((8, 8), 60, min_block=16)
    for _ in range(300):
        assert int(masker(rng).sum()) == 60


def test_num_masked_for_and_factory():
    assert num_masked_for((14, 14), 0.4, None) == 78
    assert num_masked_for((14, 14), 0.4, 75) == 75
    assert num_masked_for((8, 8), 0.4, None) == 26
    with pytest.raises(ValueError):
        num_masked_for((8, 8), 1.0, None)
    with pytest.raises(ValueError):
        num_masked_for((8, 8), None, 64)
    assert isinstance(make_masker("block", (8, 8), 26, min_block=4), BlockMasking)
    assert isinstance(make_masker("random", (8, 8), 26), RandomMasking)
    with pytest.raises(ValueError):
        make_masker("grid", (8, 8), 26)


def test_masks_are_fast_enough_for_loader_workers():
    import time

    rng = np.random.default_rng(4)
    masker = BlockMasking((14, 14), 75)
    start = time.perf_counter()
    for _ in range(500):
        masker(rng)
    per_mask = (time.perf_counter() - start) / 500
    assert per_mask < 5e-3  # ~0.1 ms here; a 224 px image decode + resize costs far more
