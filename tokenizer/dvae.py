"""BEiT v1's discrete VAE: conv encoder -> logits over the vocabulary per grid cell, Gumbel-softmax
relaxation (temperature annealed by the trainer), conv decoder back to pixels.

Loss = reconstruction (MSE in normalised pixel space) + ``kl_weight`` * KL(q(z|x) || uniform).
Tokens at inference are the argmax of the logits. The decoder's first layer is a bias-free 1x1 conv
from one-hot codes to ``code_dim`` channels: its weight is the code embedding (``codebook()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.base import Tokenizer, TokenizerConfig


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DVAE(Tokenizer):
    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        if config.kind != "dvae":
            raise ValueError(f"DVAE needs a config with kind 'dvae', got {config.kind!r}")
        stages = int(math.log2(config.patch_size))
        w, k, depth = config.width, config.vocab_size, config.depth
        chans = [w * min(2**i, 4) for i in range(stages + 1)]

        enc: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1)]
        for i in range(stages):
            enc += [ResBlock(chans[i]) for _ in range(depth)]
            enc += [nn.ReLU(), nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1)]
        enc += [ResBlock(chans[-1]) for _ in range(depth)]
        enc += [nn.ReLU(), nn.Conv2d(chans[-1], k, 1)]
        self.encoder = nn.Sequential(*enc)

        self.code_embed = nn.Conv2d(k, config.code_dim, 1, bias=False)
        dec: list[nn.Module] = [nn.Conv2d(config.code_dim, chans[-1], 3, padding=1)]
        for i in reversed(range(stages)):
            dec += [ResBlock(chans[i + 1]) for _ in range(depth)]
            dec += [nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[i + 1], chans[i], 3, padding=1)]
        dec += [ResBlock(chans[0]) for _ in range(depth)]
        dec += [nn.ReLU(), nn.Conv2d(chans[0], 3, 1)]
        self.decoder = nn.Sequential(*dec)
        nn.init.normal_(self.code_embed.weight, std=1.0 / math.sqrt(config.code_dim))

    # --- training -----------------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, K, h, w]`` logits over the vocabulary."""
        return self.encoder(self.normalize(images))

    def decode_soft(self, soft_codes: torch.Tensor) -> torch.Tensor:
        """``[B, K, h, w]`` (one-hot or relaxed) codes -> normalised pixels ``[B, 3, S, S]``."""
        return self.decoder(self.code_embed(soft_codes))

    def forward(self, images: torch.Tensor, temperature: float = 1.0, kl_weight: float = 0.0, hard: bool = False):
        """Training forward: (loss, argmax ids ``[B, h, w]``, parts)."""
        target = self.normalize(images)
        logits = self.encoder(target)
        soft = F.gumbel_softmax(logits.float(), tau=temperature, hard=hard, dim=1)
        recon = self.decode_soft(soft.to(logits.dtype))
        rec = F.mse_loss(recon.float(), target.float())
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(self.vocab_size)  # KL(q || uniform)
        loss = rec + kl_weight * kl
        return loss, logits.argmax(dim=1), {"rec": rec.detach(), "kl": kl.detach()}

    # --- the interface ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "the dvae assigns tokens by argmax over logits, not by nearest code vector: "
            "it has no code-space features to re-assign"
        )

    def codebook(self) -> torch.Tensor:
        return self.code_embed.weight[:, :, 0, 0].t()  # [K, code_dim]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.check_tokens(tokens)
        codes = self.codebook()[tokens].permute(0, 3, 1, 2)  # == code_embed(one_hot(tokens))
        return self.denormalize(self.decoder(codes))
