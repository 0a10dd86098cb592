"""Images for tokenizer training: a source slice as a torch ``Dataset``, and the held-out measurements.

Undecodable items come back as ``(None, reason)`` and ``collate_good`` drops them from their batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokenizer.train_config import Plan


class ShardImages(torch.utils.data.Dataset):
    """Items ``indices`` of a source rendered at ``size``: ``(uint8 [3, S, S] | None, bad reason)``."""

    def __init__(self, spec: str, indices, size: int, *, augment: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0), seed: int = 0, cache: bool = False):
        self.spec, self.indices, self.size = spec, indices, size
        self.augment, self.crop_scale, self.seed, self.cache = augment, tuple(crop_scale), seed, cache
        self.epoch = 0
        self._source = None
        self._decoded: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None  # reopened from the spec in each loader process
        return state

    def _load(self, i: int) -> tuple[str, np.ndarray | None, str | None]:
        if i in self._decoded:
            return self._decoded[i]
        from pipeline.images import BadImageError, decode_rgb
        from pipeline.sources import BadInput, Partition, open_source

        if self._source is None:
            self._source = open_source(self.spec)
        try:
            item = next(iter(self._source.iter_partition(Partition(-1, i, i + 1))))
        except Exception as e:  # an unreadable item must not stop training
            res = (f"item-{i}", None, f"{self.spec}[{i}]: cannot read ({type(e).__name__}: {e})")
        else:
            if isinstance(item, BadInput):
                res = (item.key, None, f"{item.origin}: {item.reason}")
            else:
                try:
                    res = (item.key, np.asarray(decode_rgb(item.data)), None)
                except BadImageError as e:
                    res = (item.key, None, f"{item.origin}: {e.reason}")
        if self.cache:
            self._decoded[i] = res
        return res

    def __getitem__(self, j: int):
        from PIL import Image

        from pipeline.views import centre_view, make_views, render_view

        key, pixels, reason = self._load(self.indices[j])
        if pixels is None:
            return None, reason
        img = Image.fromarray(pixels)
        if self.augment:
            view = make_views(key, img.width, img.height, 2, seed=self.seed * 1_000_003 + self.epoch, scale=self.crop_scale)[0]
        else:
            view = centre_view(img.width, img.height)
        out = np.asarray(render_view(img, view, self.size), dtype=np.uint8)
        return torch.from_numpy(out.copy()).permute(2, 0, 1), None


def collate_good(items):
    good = [t for t, _ in items if t is not None]
    bad = [r for t, r in items if t is None]
    return (torch.stack(good) if good else None), bad


# --- held-out images (rank 0, after training) ---------------------------------------------------
@torch.no_grad()
def evaluate_heldout(tok, plan: Plan, batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Codebook usage (codes used, perplexity) of the tokens of the held-out images."""
    from tokenizer.quantizer import usage_stats

    data = ShardImages(plan.heldout_spec, range(plan.heldout_start, plan.heldout_stop), tok.input_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_good)
    counts = torch.zeros(tok.vocab_size, dtype=torch.float64)
    images = bad = 0
    for batch, reasons in loader:
        bad += len(reasons)
        if batch is None:
            continue
        ids = tok.encode(batch.to(device).float().div_(255.0))
        counts += torch.bincount(ids.reshape(-1).cpu(), minlength=tok.vocab_size).double()
        images += batch.shape[0]
    return {"images": images, "bad_inputs": bad, "tokens": int(counts.sum()), "description": plan.heldout_desc,
            "vocab_size": tok.vocab_size, **usage_stats(counts)}


@torch.no_grad()
def reconstruction_grid(tok, plan: Plan, device: torch.device | str = "cpu", n: int = 8) -> np.ndarray:
    """uint8 HWC image: held-out inputs (left) beside the dVAE's decode of their tokens (right)."""
    data = ShardImages(plan.heldout_spec, range(plan.heldout_start, min(plan.heldout_stop, plan.heldout_start + n)), tok.input_size)
    batch, _ = collate_good([data[j] for j in range(len(data))])
    if batch is None:
        return np.zeros((tok.input_size, 2 * tok.input_size, 3), dtype=np.uint8)
    x = batch.to(device).float().div_(255.0)
    recon = tok.decode(tok.encode(x))
    pairs = torch.cat([x, recon], dim=3)  # [B, 3, S, 2S]
    pad = torch.ones(pairs.shape[0], 3, 2, pairs.shape[3], device=pairs.device)
    rows = torch.cat([torch.cat([p, q], dim=1) for p, q in zip(pairs, pad)], dim=1)  # [3, B*(S+2), 2S]
    return (rows.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
