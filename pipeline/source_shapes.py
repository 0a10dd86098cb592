"""The built-in synthetic ``shapes`` dataset as a source (the generator is ``pipeline.shapes``)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from pipeline.images import encode_png
from pipeline.source_base import Item, Sample, Source


class ShapesSource(Source):
    """The built-in synthetic dataset; see ``pipeline.shapes``."""

    kind = "shapes"

    def __init__(self, spec: str, params: dict[str, str], partition_size: int | None):
        from pipeline.shapes import CLASSES

        super().__init__(spec, params, partition_size)
        # Item i does not depend on how many are drawn, so ``n`` (the base class's first-N subset)
        # is also how many to generate: consumed here, it is the generator's parameter (in the
        # fingerprint as it always was), not a subset of 2000.
        self.n = self.subset.n or 2000
        self.subset = dataclasses.replace(self.subset, n=None)
        self.size = int(self.params.pop("size", 64))
        self.seed = int(self.params.pop("seed", 0))
        self.split = self.params.pop("split", "train")
        self.classes = list(CLASSES)
        self._listing = list(range(self.n))

    def _fingerprint_lines(self) -> Iterator[str]:
        from pipeline.shapes import GENERATOR_VERSION

        yield f"shapes\tv{GENERATOR_VERSION}\t{self.n}\t{self.size}\t{self.seed}\t{self.split}"

    def _key(self, ref: int) -> str:
        return f"{self.split}-{ref:06d}"

    def _ref_origin(self, ref: int) -> str:
        return f"shapes[{self.split}:{ref}]"

    def _load(self, ref) -> Item:
        from pipeline.shapes import render_shape

        pixels, label = render_shape(ref, size=self.size, seed=self.seed, split=self.split)
        return Sample(self._key(ref), encode_png(pixels), "png", label, self._ref_origin(ref))
