"""BEiT v2's released VQ-KD tokenizer (encoder side), rebuilt from its published architecture.

Pixels in [0, 1] -> ``x * 255 / 127.5 - 1`` (the reference's 'default' preprocessing, in its order of
operations) -> a ViT with a [CLS] token, absolute position embeddings, BEiT attention (separate q/v
biases, no k bias), LayerNorm eps 1e-6, no layer scale; ``fc_norm`` on the patch tokens ->
``encode_task_layer`` (Linear, Tanh, Linear) -> l2-normalised 32-d features -> the nearest stored
codebook row by squared L2 (``|z|^2 + |e|^2 - 2 z.e``; the rows are used as stored, not renormalised).

Parameter names equal the released checkpoints' (``encoder.blocks.0.attn.q_bias``,
``encode_task_layer.0.weight``, ``quantize.embedding.weight``); the decoder and teacher are not kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.base import Tokenizer, TokenizerConfig

LN_EPS = 1e-6


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # explicit softmax attention in the reference's order (q scaled first), not a fused kernel,
        # so that ids match the reference forward
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Encoder(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        dim, n = config.width, config.grid * config.grid
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        hidden = round(dim * config.mlp_ratio)  # the ratio was read as fc1 width / width
        self.blocks = nn.ModuleList([Block(dim, config.num_heads, hidden) for _ in range(config.depth)])
        self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (preprocessed) -> normed patch tokens ``[B, N, dim]``."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])


class Quantizer(nn.Module):
    """Holds the codebook under the released name ``quantize.embedding.weight``."""

    def __init__(self, vocab: int, code_dim: int):
        super().__init__()
        self.embedding = nn.Module()
        self.embedding.register_buffer("weight", F.normalize(torch.randn(vocab, code_dim), dim=-1))

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Rows of ``z`` ``[M, D]`` -> ids of the nearest stored codebook rows (squared L2)."""
        e = self.embedding.weight
        d = z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", z, e)
        return d.argmin(dim=1)


class BeitV2VQKD(Tokenizer):
    """The released BEiT v2 VQ-KD behind mimflow's ``Tokenizer`` interface (kind ``vqkd``, arch ``beitv2``)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        if config.kind != "vqkd" or config.arch != "beitv2":
            raise ValueError(f"BeitV2VQKD needs kind 'vqkd' and arch 'beitv2', got {config.kind!r}/{config.arch!r}")
        dim = config.width
        self.encoder = Encoder(config)
        self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, config.code_dim))
        self.quantize = Quantizer(config.vocab_size, config.code_dim)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # the reference's 'default' preprocessing, same operations in the same order (config mean/std = 0.5
        # describe the same map)
        return self.check_images(images).float() * 255.0 / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode_task_layer(self.encoder(self.normalize(images)).float()), p=2, dim=-1)

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.features(images)
        b, n, d = z.shape
        h, w = self.grid
        return self.quantize.assign(z.reshape(b * n, d)).view(b, h, w)

    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight
