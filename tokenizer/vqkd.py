"""BEiT v2's VQ-KD tokenizer: a ViT encoder (timm blocks), a projection to a low-dimensional code
space, and an l2-normalised codebook with cosine look-up (``tokenizer.quantizer``).

Training adds ``VQKDDecoder``: a few transformer blocks that regress the teacher's per-patch
features from the quantised codes (cosine loss). Only the encoder side is exported as the tokenizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from tokenizer.base import Tokenizer, TokenizerConfig
from tokenizer.quantizer import NormEMAQuantizer


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    return nn.Sequential(
        *[Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)]
    )


class VQKD(Tokenizer):
    def __init__(self, config: TokenizerConfig, seed: int = 0):
        super().__init__(config)
        if config.kind != "vqkd":
            raise ValueError(f"VQKD needs a config with kind 'vqkd', got {config.kind!r}")
        dim, n = config.width, config.grid * config.grid
        self.patch_embed = PatchEmbed(img_size=config.input_size, patch_size=config.patch_size, in_chans=3, embed_dim=dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        self.blocks = _blocks(dim, config.depth, config.num_heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        # BEiT v2's encode_task_layer: Linear -> Tanh -> Linear to the code space.
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, config.code_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)
        self.quantizer = NormEMAQuantizer(config.vocab_size, config.code_dim, seed=seed)

    def mark_loaded(self) -> None:
        self.quantizer.initted.fill_(True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """l2-normalised code-space vectors ``[B, h*w, code_dim]`` (with gradients)."""
        x = self.patch_embed(self.normalize(images)) + self.pos_embed
        x = self.norm(self.blocks(x))
        return F.normalize(self.proj(x).float(), dim=-1)

    def quantize(self, images: torch.Tensor):
        """Training forward: (straight-through codes ``[B, N, D]``, ids ``[B, N]``, commitment loss)."""
        z = self.features(images)
        b, n, d = z.shape
        z_q, idx, commitment = self.quantizer(z.reshape(b * n, d))
        return z_q.view(b, n, d), idx.view(b, n), commitment

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.features(images)
        b, n, d = z.shape
        h, w = self.grid
        return self.quantizer.assign(z.reshape(b * n, d)).view(b, h, w)

    def codebook(self) -> torch.Tensor:
        return self.quantizer.embedding


class VQKDDecoder(nn.Module):
    """Codes ``[B, N, code_dim]`` -> predicted teacher features ``[B, N, target_dim]``."""

    def __init__(self, config: TokenizerConfig, target_dim: int):
        super().__init__()
        dim = config.decoder_width or config.width
        heads = config.num_heads if dim % config.num_heads == 0 else 1
        n = config.grid * config.grid
        self.embed = nn.Linear(config.code_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        self.blocks = _blocks(dim, config.decoder_depth, heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        # BEiT v2's decode_task_layer: Linear -> Tanh -> Linear to the teacher's dimension.
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, target_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes) + self.pos_embed
        return self.head(self.norm(self.blocks(x)))


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(pred, target)`` over patches (targets with zero norm count as 1)."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)).mean()


class VQKDTrainModule(nn.Module):
    """What DDP wraps while training: the tokenizer plus its decoder (the teacher stays outside)."""

    def __init__(self, tokenizer: VQKD, target_dim: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.decoder = VQKDDecoder(tokenizer.config, target_dim)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, commitment_weight: float = 1.0,
                quantize: bool = True):
        if not quantize:  # codebook warm-up: the decoder reads continuous outputs; no code is chosen
            rec = cosine_loss(self.decoder(self.tokenizer.features(images)), targets)
            return rec, None, {"rec": rec.detach(), "commit": torch.zeros((), device=rec.device)}
        z_q, idx, commitment = self.tokenizer.quantize(images)
        pred = self.decoder(z_q)
        rec = cosine_loss(pred, targets)
        return rec + commitment_weight * commitment, idx, {"rec": rec.detach(), "commit": commitment.detach()}
