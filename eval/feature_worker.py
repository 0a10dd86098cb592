"""One partition in, its features out: the unit of feature extraction, as a Ray actor or in-process.

A ``FeatureWorker`` holds every encoder of a run (the pretrained one, loaded from its location, and
the random-init baseline, rebuilt from its seed; both checked against the driver's encoder ids) and
the reopened source. For a partition it decodes each image once per encoder input size (centre
view, ``eval.features.decode_partition``), runs each encoder that still lacks the partition, and
writes one part file per encoder (``write_part``). Only counts and skipped items go back to the
driver: images never leave the worker.

A part file is ``<entry>/parts/part-<index>-<digest>.npz``: ``features`` float32 ``[n, D]``,
``labels`` int64, ``keys`` (unicode), ``info`` (JSON: the partition, skipped items); it is written
atomically, so its presence means the partition is done (resume after a kill). No pickles:
it is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any

import numpy as np

from eval.eval_config import EvalError
from eval.features import Encoder, LabelledImages, compute_features, decode_partition, open_labelled
from pipeline import storage

PARTS_DIR = "parts"


def part_name(part: Any) -> str:
    """Named by index and a digest of the partition's description, so a changed partitioning never
    reuses a stale part."""
    desc = json.dumps(dataclasses.asdict(part), sort_keys=True, default=str)
    return f"part-{part.index:06d}-{hashlib.sha256(desc.encode()).hexdigest()[:12]}.npz"


def write_part(path: str, part: Any, features: np.ndarray, imgs: LabelledImages) -> None:
    info = {"partition": dataclasses.asdict(part), "skipped": imgs.skipped}
    buf = io.BytesIO()
    np.savez(buf, features=features.astype(np.float32, copy=False), labels=imgs.labels,
             keys=np.asarray(imgs.keys, dtype=str), info=np.asarray(json.dumps(info)))
    storage.write_bytes_atomic(path, buf.getvalue())


def read_part(path: str) -> tuple[np.ndarray, np.ndarray, list[str], list[dict[str, str]]]:
    """(features, labels, keys, skipped) of a part file."""
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
        info = json.loads(str(z["info"]))
        return z["features"], z["labels"].astype(np.int64), [str(k) for k in z["keys"]], info["skipped"]


@dataclasses.dataclass(frozen=True)
class EncoderRef:
    """How a worker gets an encoder: loaded from ``location``, or ``random:<seed>`` (the baseline,
    rebuilt from the pretrained encoder's config), checked against the driver's ``encoder_id``."""

    name: str
    location: str
    encoder_id: str

    @classmethod
    def of(cls, enc: Encoder) -> "EncoderRef":
        location = enc.location
        if not (location.startswith("random:") or storage.is_uri(location)):
            location = os.path.abspath(location)  # workers may run in another directory
        return cls(enc.name, location, enc.encoder_id)


def load_encoders(refs: list[EncoderRef]) -> dict[str, Encoder]:
    """Rebuild the driver's encoders here (weights by path, not through Ray's object store: a
    restarted actor reloads them the same way); an id mismatch is an error, never silent."""
    from eval.features import load_encoder, random_encoder

    pretrained = [r for r in refs if not r.location.startswith("random:")]
    base = load_encoder(pretrained[0].location) if pretrained else None
    out = {}
    for ref in refs:
        if ref.location.startswith("random:"):
            if base is None:
                raise EvalError(f"encoder {ref.name!r} ({ref.location}) needs the pretrained encoder's config")
            enc = random_encoder(base, int(ref.location.split(":", 1)[1]))
        else:
            enc = base if ref.location == pretrained[0].location else load_encoder(ref.location)
        if enc.encoder_id != ref.encoder_id:
            raise EvalError(f"encoder {ref.location} has id {enc.encoder_id} on this worker, {ref.encoder_id} "
                            "on the driver: put it on storage every node reads the same")
        out[ref.name] = dataclasses.replace(enc, name=ref.name)
    return out


class FeatureWorker:
    """Encoders loaded once; ``run`` turns one partition into part files."""

    def __init__(self, spec: str, encoders: list[EncoderRef] | list[Encoder], pooling: str, layer: int | None,
                 batch_size: int, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)  # the actor's share of the node's CPUs
        self.source = open_labelled(spec)
        if all(isinstance(e, Encoder) for e in encoders):  # in the driver's process: use them as they are
            self.encoders = {e.name: e for e in encoders}
        else:
            self.encoders = load_encoders(encoders)
        self.pooling, self.layer, self.batch_size = pooling, layer, batch_size

    def ready(self) -> bool:
        return True

    def run(self, part: Any, jobs: dict[str, str]) -> dict[str, Any]:
        """``jobs``: encoder name -> part file to write. Returns counts, skipped items and timings."""
        t0 = time.perf_counter()
        decoded: dict[int, LabelledImages] = {}
        encode_s = 0.0
        for name, path in jobs.items():
            enc = self.encoders[name]
            if enc.img_size not in decoded:  # one decode per input size, shared by the encoders
                decoded[enc.img_size] = decode_partition(self.source, part, enc.img_size)
            imgs = decoded[enc.img_size]
            t1 = time.perf_counter()
            if len(imgs):
                feats = compute_features(enc, imgs.pixels, pooling=self.pooling, layer=self.layer,
                                         batch_size=self.batch_size)
            else:  # a partition of bad inputs only: an empty part keeps the count honest
                feats = np.zeros((0, int(enc.model.num_features)), np.float32)
            encode_s += time.perf_counter() - t1
            write_part(path, part, feats, imgs)
        imgs = next(iter(decoded.values()))
        return {"index": part.index, "images": len(imgs), "skipped": len(imgs.skipped),
                "seconds": time.perf_counter() - t0, "encode_s": encode_s}
