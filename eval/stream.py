"""The streaming labelled-image loader fine-tuning trains and evaluates from (``eval.finetune``).

``LabelledStream`` is a torch ``IterableDataset`` over a source's partitions: each Ray Train rank
(and each DataLoader worker within it) reads its own share of the partitions, decodes as it goes and
yields uint8 batches, so no process holds the data set. ``keys`` restricts it to those items (a
label subset, a validation split): partitions are cut down to their positions, so the other items
are never read. Training (``cycle=True``) yields exactly ``batches_per_epoch`` batches per rank,
cycling over its partitions when it runs short: uneven partitions never give DDP ranks different
batch counts (a gloo hang). Evaluation (``cycle=False``) reads each of the rank's items once, the
last batch short, and ranks may hold none. Views are the centre square, or with ``augment`` a
random-resized crop + flip drawn from (seed, epoch, pass, key) by ``pipeline.views.make_views``: a
small subset cycled many times within an epoch gets a new crop every pass.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import torch

from eval.features import decode_partition, open_labelled
from pipeline.source_base import Partition


class LabelledStream(torch.utils.data.IterableDataset):
    """``{"image": uint8 [B, 3, S, S], "label": int64 [B]}`` batches from ``spec``, this rank's share."""

    def __init__(self, spec: str, size: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 augment: bool = False, seed: int = 0, batches_per_epoch: int | None = None,
                 keys: list[str] | None = None, cycle: bool = True):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.spec, self.size, self.batch_size = spec, size, batch_size
        self.rank, self.world_size, self.augment, self.seed = rank, world_size, augment, seed
        self.keys = None if keys is None else frozenset(keys)
        self.cycle = cycle
        n = len(open_labelled(spec)) if keys is None else len(self.keys)
        self.batches_per_epoch = batches_per_epoch or max(1, math.ceil(n / (world_size * batch_size)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _every(self, source) -> list[Partition]:
        """The source's partitions, cut down to ``keys`` (empty ones dropped) when given."""
        every = source.partitions()
        if self.keys is None:
            return every
        listing = source.keys()
        cut = [Partition(p.index, 0, 0, tuple(i for i in p.positions if listing[i] in self.keys)) for p in every]
        return [p for p in cut if p.positions]

    def _parts(self, source) -> list:
        """This rank's partitions, then this DataLoader worker's share, in the epoch's order. When
        cycling, a rank (or worker) left without any reads all of them: equal batch counts matter more."""
        every = self._every(source)
        parts = every[self.rank :: self.world_size] or (every if self.cycle else [])
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            parts = parts[info.id :: info.num_workers] or (parts if self.cycle else [])
        random.Random(f"{self.seed}:{self.epoch}:{self.rank}").shuffle(parts)
        return parts

    def _partition(self, source, part, npass: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        """(uint8 [3, S, S], label) of one partition's labelled, decodable samples (pass ``npass``)."""
        if not self.augment:
            imgs = decode_partition(source, part, self.size)
            for i in np.random.default_rng([self.seed, self.epoch, part.index]).permutation(len(imgs)):
                yield imgs.pixels[i], int(imgs.labels[i])
            return
        from pipeline.images import BadImageError, decode_rgb
        from pipeline.sources import Sample
        from pipeline.views import make_views, render_view

        for item in source.iter_partition(part):
            if not isinstance(item, Sample) or item.label is None:
                continue
            try:
                img = decode_rgb(item.data)
            except BadImageError:
                continue  # listed by feature extraction's skipped items; a training stream moves on
            # V=2 draws random-resized crops (V=1 is the centre square); a new draw every epoch
            draw = (self.seed * 100003 + self.epoch) * 1009 + npass
            view = make_views(item.key, img.width, img.height, 2, seed=draw)[0]
            yield np.asarray(render_view(img, view, self.size), np.uint8).transpose(2, 0, 1), int(item.label)

    def _samples(self, source, parts: list) -> Iterator[tuple[np.ndarray, int]]:
        """The partitions' samples, cycled until the caller has its batches (once unless cycling)."""
        npass = 0
        while True:
            n = 0
            for part in parts:
                for sample in self._partition(source, part, npass):
                    n += 1
                    yield sample
            npass += 1
            if n == 0 or not self.cycle:
                return

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        source = open_labelled(self.spec)
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        # this worker's share of the rank's batches (the first workers take the remainder)
        wid = info.id if info is not None else 0
        todo = self.batches_per_epoch // workers + (1 if wid < self.batches_per_epoch % workers else 0)
        if not self.cycle:
            todo = None  # every item once
        samples = self._samples(source, self._parts(source))
        while todo is None or todo > 0:
            todo = None if todo is None else todo - 1
            batch = [s for _, s in zip(range(self.batch_size), samples)]
            if not batch:
                return
            yield {"image": torch.from_numpy(np.stack([p for p, _ in batch])),
                   "label": torch.tensor([y for _, y in batch], dtype=torch.int64)}
