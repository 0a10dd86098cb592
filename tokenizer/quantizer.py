"""The VQ-KD codebook: l2-normalised codes, cosine look-up, EMA updates, k-means init, dead-code restart.

The codebook is a buffer, not a parameter: gradients never touch it. In training mode each forward

1. (until initialised) collects the encoder's outputs from every rank and, once it holds enough,
   runs spherical k-means (FAISS) on rank 0 and broadcasts the centroids;
2. assigns each vector to its nearest code by cosine similarity;
3. updates the codes by EMA, as BEiT v2 does: for each code ``k`` used by the (all-reduced) batch,
   ``e_k <- normalize(decay * e_k + (1 - decay) * normalize(mean of the vectors assigned to k))``;
   unused codes keep their value. Counts and sums are all-reduced over ranks, so every rank applies
   the same update and holds the same codebook;
4. every ``restart_every`` steps, codes no vector used since the last check (over all ranks) are
   restarted on random recent encoder outputs (chosen on rank 0, broadcast).

The output is straight-through (``z + (z_q - z).detach()``); the commitment term ``||z - sg(z_q)||²``
is returned for the trainer to weight.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else 0


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _dist_ready():
        torch.distributed.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _dist_ready():
        torch.distributed.broadcast(t, src=0)
    return t


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[n_r, D]`` tensors of every rank (sizes may differ), in rank order."""
    if not _dist_ready():
        return x
    world = torch.distributed.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    padded = torch.zeros((top, *x.shape[1:]), device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def kmeans_codes(x: np.ndarray, k: int, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids ``[k, D]`` (l2-normalised) of the rows of ``x`` (FAISS).

    With fewer points than codes, codes are data points (with replacement) plus a little noise.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    if n >= k:
        km = faiss.Kmeans(d, k, niter=iters, spherical=True, seed=seed, verbose=False, min_points_per_centroid=1)
        km.train(x)
        centroids = km.centroids.copy()
    else:
        centroids = x[rng.integers(0, n, size=k)] + 0.01 * rng.standard_normal((k, d)).astype(np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    bad = norms[:, 0] < 1e-8  # an empty cluster can come back as zeros: put it on a data point
    if bad.any():
        centroids[bad] = x[rng.integers(0, n, size=int(bad.sum()))]
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids / np.maximum(norms, 1e-12)


class NormEMAQuantizer(nn.Module):
    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        decay: float = 0.99,
        kmeans_iters: int = 10,
        kmeans_points_per_code: int = 4,
        kmeans_max_batches: int = 8,
        kmeans_max_points: int = 200_000,
        restart_every: int = 0,
        buffer_size: int = 8192,
        seed: int = 0,
    ):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.decay = decay
        self.kmeans_iters = kmeans_iters
        self.kmeans_points_per_code = kmeans_points_per_code
        self.kmeans_max_batches = kmeans_max_batches
        self.kmeans_max_points = kmeans_max_points
        self.restart_every = restart_every
        self.buffer_size = buffer_size
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("embedding", F.normalize(torch.randn(num_codes, dim, generator=gen), dim=-1))
        # Training state: not part of the exported tokenizer (saved in training checkpoints instead).
        self.register_buffer("initted", torch.tensor(False), persistent=False)
        self.register_buffer("cluster_size", torch.zeros(num_codes), persistent=False)
        self.register_buffer("usage", torch.zeros(num_codes), persistent=False)  # since the last restart check
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("recent", torch.zeros(0, dim), persistent=False)
        self._init_rows: list[torch.Tensor] = []
        self._init_batches = 0
        self.restarted_total = 0

    # --- training state in checkpoints --------------------------------------------------------
    def training_state(self) -> dict[str, torch.Tensor]:
        return {
            "initted": self.initted.detach().cpu().clone(),
            "cluster_size": self.cluster_size.detach().cpu().clone(),
            "usage": self.usage.detach().cpu().clone(),
            "steps": self.steps.detach().cpu().clone(),
            "recent": self.recent.detach().cpu().clone(),
        }

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            setattr(self, name, value.to(self.embedding.device))

    # --- look-up -------------------------------------------------------------------------------
    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code by cosine similarity (``z`` rows are l2-normalised): ``[N]`` int64."""
        with torch.autocast(z.device.type, enabled=False):  # fp32 under bf16 autocast too (as the cache build)
            return (z.float() @ self.embedding.t()).argmax(dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z``: ``[N, D]`` l2-normalised. Returns (straight-through ``z_q``, ids ``[N]``, commitment)."""
        z = z.float()
        if self.training:
            self._maybe_init(z.detach())
        idx = self.assign(z.detach())
        z_q = self.embedding[idx]
        commitment = F.mse_loss(z, z_q.detach())
        if self.training and bool(self.initted):
            self.ema_update(z.detach(), idx)
            self._remember(z.detach())
            self.steps += 1
            if self.restart_every and int(self.steps) % self.restart_every == 0:
                self.restart_dead_codes()
        return z + (z_q - z).detach(), idx, commitment

    # --- EMA -----------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One EMA step from this batch (all ranks); returns the all-reduced per-code counts."""
        bins = torch.bincount(idx, minlength=self.num_codes).to(self.embedding.dtype)
        sums = torch.zeros_like(self.embedding).index_add_(0, idx, z.to(self.embedding.dtype))
        _all_reduce(bins)
        _all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(bins, alpha=1 - self.decay)
        self.usage.add_(bins)
        used = bins > 0
        means = F.normalize(sums / bins.clamp(min=1.0).unsqueeze(1), dim=-1)
        target = torch.where(used.unsqueeze(1), means, self.embedding)
        self.embedding.copy_(F.normalize(self.decay * self.embedding + (1 - self.decay) * target, dim=-1))
        return bins

    # --- k-means init --------------------------------------------------------------------------
    @torch.no_grad()
    def _maybe_init(self, z: torch.Tensor) -> None:
        if bool(self.initted):
            return
        rows = all_gather_rows(z)
        self._init_rows.append(rows.cpu())
        self._init_batches += 1
        have = sum(r.shape[0] for r in self._init_rows)
        enough = have >= self.num_codes * self.kmeans_points_per_code
        if enough or self._init_batches >= self.kmeans_max_batches:
            self.kmeans_init(torch.cat(self._init_rows))
            self._init_rows, self._init_batches = [], 0

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor) -> None:
        """Codes := spherical k-means centroids of ``x`` (computed on rank 0, broadcast)."""
        if _rank() == 0:
            x = x.float().cpu()
            if x.shape[0] > self.kmeans_max_points:
                g = torch.Generator().manual_seed(self.seed)
                x = x[torch.randperm(x.shape[0], generator=g)[: self.kmeans_max_points]]
            codes = torch.from_numpy(kmeans_codes(x.numpy(), self.num_codes, self.kmeans_iters, self.seed))
            self.embedding.copy_(codes.to(self.embedding))
        _broadcast(self.embedding)
        self.initted.fill_(True)
        self.usage.zero_()

    # --- dead codes ----------------------------------------------------------------------------
    @torch.no_grad()
    def _remember(self, z: torch.Tensor) -> None:
        keep = max(1, self.buffer_size // 8)
        if z.shape[0] > keep:
            z = z[torch.randperm(z.shape[0], device=z.device)[:keep]]
        self.recent = torch.cat([self.recent.to(z), z])[-self.buffer_size :]

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Codes unused since the last check move onto random recent encoder outputs; returns how many."""
        dead = self.usage == 0  # usage is all-reduced: the same set on every rank
        n_dead = int(dead.sum())
        if n_dead and self.recent.shape[0]:
            if _rank() == 0:
                pool = self.recent
                replace = pool.shape[0] < n_dead
                pick = (
                    torch.randint(0, pool.shape[0], (n_dead,), device=pool.device)
                    if replace
                    else torch.randperm(pool.shape[0], device=pool.device)[:n_dead]
                )
                new = pool[pick]
                if replace:
                    new = new + 0.01 * torch.randn_like(new)
                self.embedding[dead] = F.normalize(new.to(self.embedding), dim=-1)
            _broadcast(self.embedding)
            self.cluster_size[dead] = 0.0
            self.restarted_total += n_dead
        else:
            n_dead = 0
        self.usage.zero_()
        return n_dead


def usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """Codes used and perplexity (exp of the entropy of the code distribution) from per-code counts."""
    counts = counts.double()
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total <= 0:
        return {"codes_used": 0, "usage": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    perplexity = float(torch.exp(-(p * p.log()).sum()))
    return {"codes_used": used, "usage": used / counts.numel(), "perplexity": perplexity}
