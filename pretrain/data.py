"""The pretraining input pipeline: token-cache shards → masked batches, in data loader workers.

Each rank streams the cache's shards with ``webdataset`` in *resampled* mode (shards drawn at random,
with replacement, forever) and the loader stops after a fixed number of batches
(``WebLoader(...).with_epoch(n)``), so every rank gets exactly the same number of batches however
uneven the shards are: uneven counts would leave one rank waiting in an all-reduce that never comes.

Per sample (in a loader worker): decode the cache sample, pick one of its V views at random, rebuild
exactly that crop from the stored source bytes with ``pipeline.views.render_view`` (the function the
cache builder used), take that view's tokens, and draw the mask. Pixels leave the workers as uint8
(4x fewer bytes through the loader's queues) and are normalised in the step, on its device. For
``tokens-online`` the sample also carries the tokenizer-resolution rendering (uint8) of the same view,
or of a fresh random-resized crop with ``augment: random_resized_crop``, since the tokenizer then runs
in the training step and any augmentation is allowed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.images import decode_rgb
from pipeline.shards import decode_sample
from pipeline.views import View, render_view

AUGMENTS = ("views", "random_resized_crop")


@dataclass
class DataConfig:
    tokens: str = ""  # the token cache directory, tokens/<tokenizer_id> (images + tokens)
    tokenizer: str = ""  # the tokenizer directory: checked against the cache; run by tokens-online
    img_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    batch_size: int = 2048  # global: split evenly over the Ray Train workers
    loader_workers: int = 4  # data loader processes per Ray Train worker (0: in the training process)
    shuffle_buffer: int = 2000  # samples, per loader process
    augment: str = "views"  # views | random_resized_crop (tokens-online and pixels only)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random_resized_crop area range
    prefetch: int = 2  # batches prefetched per loader process


def split_by_rank(src: Iterator[Any], rank: int = 0, world: int = 1) -> Iterator[Any]:
    """The webdataset node splitter, with the rank given explicitly (robust to fork/spawn loaders)."""
    yield from islice(src, rank, None, world) if world > 1 else src


def random_view(rng: np.random.Generator, width: int, height: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> View:
    """A random-resized crop box + flip, as torchvision draws them (fallback: the centre square)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return View((x0, y0, x0 + w, y0 + h), bool(rng.random() < 0.5))
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return View((x0, y0, x0 + side, y0 + side), bool(rng.random() < 0.5))


def pixels(img) -> torch.Tensor:
    """PIL RGB -> uint8 ``[3, H, W]`` (a quarter of float32's bytes between processes)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class SampleTransform:
    """Cache sample → ``{"image", "mask", "tokens" | "tok_image"}``; runs in loader workers (picklable).

    Images stay uint8 ``[3, H, W]`` here (the step normalises them on its device: ``pipeline.train_worker.normalize_uint8``).
    """

    def __init__(self, *, img_size: int, masker, target: str = "tokens",
                 tok_input_size: int | None = None, augment: str = "views", crop_scale=(0.2, 1.0),
                 seed: int = 0, rank: int = 0, salt: int = 0):
        if augment not in AUGMENTS:
            raise ValueError(f"data.augment must be one of {AUGMENTS}, got {augment!r}")
        if augment != "views" and target == "tokens":
            raise ValueError("data.augment=random_resized_crop needs target tokens-online or pixels: cached "
                             "tokens exist only for the cached views")
        if target == "tokens-online" and not tok_input_size:
            raise ValueError("tokens-online needs the tokenizer's input size")
        self.img_size = img_size
        self.masker = masker
        self.target = target
        self.tok_input_size = tok_input_size
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.seed = (int(seed), int(rank), int(salt))
        self._rng: np.random.Generator | None = None
        self._pid = None

    def rng(self) -> np.random.Generator:
        """One generator per process: seeded by (seed, rank, salt, loader worker id)."""
        if self._rng is None or self._pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else -1
            self._rng = np.random.default_rng(np.random.SeedSequence([*self.seed, worker + 1]))
            self._pid = os.getpid()
        return self._rng

    def __call__(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = self.rng()
        sample = decode_sample(raw)
        img = decode_rgb(sample.image)
        if self.augment == "views":
            v = int(rng.integers(len(sample.views)))
            view = sample.views[v]
        else:
            v, view = -1, random_view(rng, img.width, img.height, self.crop_scale)
        out = {"image": pixels(render_view(img, view, self.img_size)),
               "mask": torch.from_numpy(self.masker(rng).reshape(-1))}
        if self.target == "tokens":
            out["tokens"] = torch.from_numpy(sample.tokens[v].astype(np.int64))
        elif self.target == "tokens-online":
            out["tok_image"] = pixels(render_view(img, view, self.tok_input_size))  # the tokenizer takes uint8
        return out


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # webdataset's map puts __key__ (and __url__) back on each dict: tensors only
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0] if not k.startswith("__")}


def make_dataset(urls: list[str], transform: SampleTransform, batch_size: int, *, shuffle_buffer: int = 1000,
                 rank: int = 0, world: int = 1, seed: int = 0):
    """An endless stream of batches (resampled shards → shuffle → transform → batch) for one rank."""
    import webdataset as wds

    ds = wds.WebDataset(
        list(urls),
        resampled=True,
        shardshuffle=False,  # resampled mode draws shards at random already
        nodesplitter=partial(split_by_rank, rank=rank, world=world),
        seed=seed,
        empty_check=False,
    )
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, max(64, shuffle_buffer // 4)))
    return ds.map(transform).batched(batch_size, collation_fn=collate, partial=False)


def make_loader(dataset, num_batches: int, *, workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
    """Exactly ``num_batches`` batches, whatever the shards hold (``with_epoch`` on the loader)."""
    import webdataset as wds

    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False, multiprocessing_context="fork")
    return wds.WebLoader(dataset, **kwargs).with_epoch(num_batches)


__all__ = ["AUGMENTS", "DataConfig", "SampleTransform", "collate", "make_dataset", "make_loader",
           "pixels", "random_view", "split_by_rank"]
