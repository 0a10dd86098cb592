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

Shard contents are not trusted: token ids are range-checked as each sample is decoded, and anything
unreadable (a damaged tar, a sample missing a member) stops the run with one ``CacheError`` line
naming the shard, the key and ``mimflow tokens verify``. ``data.verify_shards`` also checks each
shard's sha256 against the manifest as it is opened (it reads each shard whole once per pass).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Annotated, Any, Iterator, Literal

import numpy as np
import torch

from pipeline import storage
from pipeline.config import PATH, Range
from pipeline.images import decode_rgb
from pipeline.tensors import pixels
from pipeline.token_cache import CacheError, decode_sample, sample_error
from pipeline.views import Interpolation, ViewStyle, draw_view, render_view

AUGMENTS = ("views", "random_resized_crop")


@dataclass
class DataConfig:
    tokens: Annotated[str, PATH] = ""  # the token cache directory, tokens/<tokenizer_id> (images + tokens)
    tokenizer: Annotated[str, PATH] = ""  # the tokenizer directory: checked against the cache; run by tokens-online
    img_size: Annotated[int, Range(ge=1)] = 224
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: Annotated[list[float], Range(gt=0)] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    batch_size: Annotated[int, Range(ge=1)] = 2048  # global: split evenly over the Ray Train workers
    loader_workers: Annotated[int, Range(ge=0)] = 4  # data loader processes per Ray Train worker (0: in the training process)
    shuffle_buffer: Annotated[int, Range(ge=0)] = 2000  # samples, per loader process
    augment: Literal["views", "random_resized_crop"] = "views"  # views | random_resized_crop (tokens-online and pixels only)
    crop_scale: Annotated[list[float], Range(gt=0, le=1)] = field(default_factory=lambda: [0.2, 1.0])  # random_resized_crop area range
    # random_resized_crop's jitter and each side's resampling (augment: views takes them from the cache's views)
    jitter: Annotated[float, Range(ge=0, le=1)] = 0.0  # colour-jitter strength (brightness, contrast, saturation)
    interp: Interpolation = "bicubic"  # the ViT's input
    tok_interp: Interpolation = "bicubic"  # the tokenizer's input (tokens-online)
    prefetch: Annotated[int, Range(ge=1)] = 2  # batches prefetched per loader process
    verify_shards: bool = False  # check each shard's sha256 (from the manifest) as it is opened

    def validate(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std: need 3 values each, got {self.mean} / {self.std}")
        if len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale: must be [lo, hi] with lo <= hi, got {self.crop_scale}")

    def view_style(self) -> ViewStyle:
        """The style of ``augment: random_resized_crop``'s fresh views."""
        return ViewStyle(tuple(self.crop_scale), self.jitter, self.interp, self.tok_interp)


def _shard_error(exn: Exception) -> bool:
    """webdataset's exception handler: a damaged shard becomes one CacheError line naming it."""
    if isinstance(exn, CacheError):
        raise exn
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
    first = exn.args[0] if exn.args else type(exn).__name__
    raise sample_error(url, None, f"unreadable tar ({type(exn).__name__}: {str(first).split(' @ ')[0]})") from None


class ShardOpener:
    """webdataset's opener stage: opens each shard through ``pipeline.storage``; with ``sha256``
    (url -> the manifest's sha256) reads it whole and refuses one whose bytes differ."""

    def __init__(self, sha256: dict[str, str] | None = None):
        self.sha256 = sha256

    def __call__(self, urls: Iterator[Any]) -> Iterator[dict[str, Any]]:
        for url in urls:
            url = url["url"] if isinstance(url, dict) else url
            if self.sha256 is None:
                yield {"url": url, "stream": storage.open_input(url)}
                continue
            data = storage.read_bytes(url)
            want = self.sha256.get(url)
            got = hashlib.sha256(data).hexdigest()
            if got != want:
                raise sample_error(url, None, f"sha256 {got[:12]}… differs from the manifest's {str(want)[:12]}…")
            yield {"url": url, "stream": io.BytesIO(data)}


def split_by_rank(src: Iterator[Any], rank: int = 0, world: int = 1) -> Iterator[Any]:
    """The webdataset node splitter, with the rank given explicitly (robust to fork/spawn loaders)."""
    yield from islice(src, rank, None, world) if world > 1 else src


class SampleTransform:
    """Cache sample → ``{"image", "mask", "tokens" | "tok_image"}``; runs in loader workers (picklable).

    Images stay uint8 ``[3, H, W]`` here (the step normalises them on its device: ``pipeline.tensors.normalize``).
    ``style`` draws the fresh views of ``augment: random_resized_crop`` (default: crop scale 0.2..1, no jitter).
    """

    def __init__(self, *, img_size: int, masker, target: str = "tokens",
                 tok_input_size: int | None = None, augment: str = "views", style: ViewStyle | None = None,
                 seed: int = 0, rank: int = 0, salt: int = 0, vocab_size: int | None = None):
        if augment not in AUGMENTS:
            raise ValueError(f"data.augment must be one of {AUGMENTS}, got {augment!r}")
        if augment != "views" and target == "tokens":
            raise ValueError("data.augment=random_resized_crop needs target tokens-online or pixels: cached "
                             "tokens exist only for the cached views")
        if target == "tokens-online" and not tok_input_size:
            raise ValueError("tokens-online needs the tokenizer's input size")
        self.img_size = img_size
        self.vocab_size = vocab_size  # cached token ids must be below it (checked per sample)
        self.masker = masker
        self.target = target
        self.tok_input_size = tok_input_size
        self.augment = augment
        self.style = style or ViewStyle(scale=(0.2, 1.0))
        self.seed = (int(seed), int(rank), int(salt))
        self._rng: np.random.Generator | None = None
        self._crop_rng: random.Random | None = None  # what pipeline.views draws crops with
        self._pid = None

    def rng(self) -> np.random.Generator:
        """One generator per process: seeded by (seed, rank, salt, loader worker id)."""
        if self._rng is None or self._pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else -1
            self._rng = np.random.default_rng(np.random.SeedSequence([*self.seed, worker + 1]))
            # its own seed, not a draw from _rng: the views' and masks' stream stays what it was
            self._crop_rng = random.Random(f"crop:{self.seed}:{worker + 1}")
            self._pid = os.getpid()
        return self._rng

    def decode(self, raw: dict[str, Any]):
        """The cache sample and its decoded image; anything unreadable is one CacheError line."""
        try:
            sample = decode_sample(raw)
            img = decode_rgb(sample.image)
            if sample.tokens.ndim != 3 or sample.tokens.shape[0] != len(sample.views) or not sample.views:
                raise ValueError(f"tokens of shape {tuple(sample.tokens.shape)} for {len(sample.views)} view(s)")
        except CacheError:
            raise  # decode_sample's own line already names the shard and the key
        except Exception as e:  # any damage inside a sample: name where it is, not a traceback
            raise sample_error(raw.get("__url__"), raw.get("__key__"), e) from None
        if self.vocab_size is not None and sample.tokens.size and int(sample.tokens.max()) >= self.vocab_size:
            raise sample_error(raw.get("__url__"), sample.key,
                               f"token id {int(sample.tokens.max())} >= the vocabulary size {self.vocab_size}")
        return sample, img

    def __call__(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = self.rng()
        sample, img = self.decode(raw)
        if self.augment == "views":
            v = int(rng.integers(len(sample.views)))
            view = sample.views[v]
        else:
            v, view = -1, draw_view(self._crop_rng, img.width, img.height, self.style)
        out = {"image": pixels(render_view(img, view, self.img_size)),
               "mask": torch.from_numpy(self.masker(rng).reshape(-1))}
        if self.target == "tokens":
            out["tokens"] = torch.from_numpy(sample.tokens[v].astype(np.int64))
        elif self.target == "tokens-online":
            out["tok_image"] = pixels(render_view(img, view, self.tok_input_size, "tokenizer"))  # uint8 too
        return out


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # webdataset's map puts __key__ (and __url__) back on each dict: tensors only
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0] if not k.startswith("__")}


def make_dataset(urls: list[str], transform: SampleTransform, batch_size: int, *, shuffle_buffer: int = 1000,
                 rank: int = 0, world: int = 1, seed: int = 0, sha256: dict[str, str] | None = None):
    """An endless stream of batches (resampled shards → shuffle → transform → batch) for one rank.

    ``sha256`` (url -> the manifest's sha256): check each shard's bytes as it is opened."""
    import webdataset as wds
    from webdataset.cache import StreamingOpen
    from webdataset.shardlists import ResampledShards

    ds = wds.WebDataset(
        list(urls),
        resampled=True,
        shardshuffle=False,  # resampled mode draws shards at random already
        nodesplitter=partial(split_by_rank, rank=rank, world=world),
        seed=seed,
        empty_check=False,
        handler=_shard_error,
    )
    # Our stages in webdataset's place: shards drawn from the seed alone (webdataset's resampled
    # mode mixes the pid and the time into it: no two runs alike), and our opener (storage URIs,
    # the optional sha256 check).
    _replace_stage(ds, ResampledShards, ResampledShards(list(urls), seed=seed, deterministic=True))
    _replace_stage(ds, StreamingOpen, ShardOpener(sha256))
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, max(64, shuffle_buffer // 4)), seed=seed)
    return ds.map(transform).batched(batch_size, collation_fn=collate, partial=False)


def _replace_stage(ds, kind: type, stage) -> None:
    found = [i for i, s in enumerate(ds.pipeline) if isinstance(s, kind)]
    if len(found) != 1:
        raise RuntimeError(f"webdataset's pipeline has changed: no single {kind.__name__} stage to replace")
    ds.pipeline[found[0]] = stage


def make_loader(dataset, num_batches: int, *, workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
    """Exactly ``num_batches`` batches, whatever the shards hold (``with_epoch`` on the loader)."""
    import webdataset as wds

    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False, multiprocessing_context="fork")
    return wds.WebLoader(dataset, **kwargs).with_epoch(num_batches)


__all__ = ["AUGMENTS", "DataConfig", "SampleTransform", "ShardOpener", "collate", "make_dataset", "make_loader",
           "split_by_rank"]
