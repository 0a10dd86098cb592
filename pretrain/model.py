"""The masked-image-modeling model, built on timm's BEiT.

``MIMModel.encoder`` *is* a ``timm.models.beit.Beit`` (no classifier, no absolute position embedding,
one relative position bias shared by all blocks, layer scale, drop path), so exporting the encoder is
saving its ``state_dict`` and the kwargs that build it (``encoder_kwargs``). Everything only
pretraining needs lives beside it: the learned mask embedding, the MIM head, and BEiT v2's [CLS]
aggregation blocks.

``forward_features`` mirrors ``Beit.forward_features`` step for step, except that the patch embeddings
of masked positions are replaced by the mask embedding; with no mask it returns exactly what the timm
model returns (a test checks it). ``forward_head`` maps masked positions to logits over the
tokenizer's vocabulary (or to pixels for the MAE target), and ``loss`` is cross-entropy (or MSE) on
masked positions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit, Block

from pipeline.config import Range

TARGETS = ("tokens", "tokens-online", "pixels")


@dataclass
class ModelConfig:
    dim: Annotated[int, Range(ge=1)] = 768
    depth: Annotated[int, Range(ge=1)] = 12
    heads: Annotated[int, Range(ge=1)] = 12
    patch: Annotated[int, Range(ge=1)] = 16
    mlp_ratio: Annotated[float, Range(gt=0)] = 4.0
    drop_path: Annotated[float, Range(ge=0, lt=1)] = 0.1
    layer_scale: Annotated[float, Range(ge=0)] = 0.1  # layer scale init value (BEiT: 0.1 base, 1e-5 large); 0 disables it
    qkv_bias: bool = True
    head: Literal["v1", "v2"] = "v1"  # v1: MIM head only; v2: + BEiT v2 [CLS] aggregation head (losses summed)
    v2_layer: Annotated[int | None, Range(ge=1)] = None  # v2: the intermediate layer whose patch tokens are aggregated (default 3/4 depth)
    v2_blocks: Annotated[int, Range(ge=1)] = 2  # v2: shallow blocks of the aggregation head

    def validate(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.v2_layer is not None and self.v2_layer > self.depth:
            raise ValueError(f"v2_layer must be in [1, depth={self.depth}], got {self.v2_layer}")


def encoder_kwargs(model: ModelConfig, img_size: int) -> dict[str, Any]:
    """Exactly the kwargs that build the encoder as ``timm.models.beit.Beit(**kwargs)`` (JSON-safe)."""
    if img_size % model.patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {model.patch}")
    if model.dim % model.heads:
        raise ValueError(f"model.dim {model.dim} is not divisible by model.heads {model.heads}")
    return {
        "img_size": img_size,
        "patch_size": model.patch,
        "in_chans": 3,
        "num_classes": 0,
        "global_pool": "avg",  # forward_head: mean of the patch tokens ...
        "use_fc_norm": False,  # ... after the final norm, which every token gets (as in pretraining)
        "embed_dim": model.dim,
        "depth": model.depth,
        "num_heads": model.heads,
        "mlp_ratio": model.mlp_ratio,
        "qkv_bias": model.qkv_bias,
        "drop_path_rate": model.drop_path,
        "init_values": model.layer_scale or None,
        "use_abs_pos_emb": False,
        "use_rel_pos_bias": False,
        "use_shared_rel_pos_bias": True,
    }


class MIMModel(nn.Module):
    def __init__(self, model: ModelConfig, img_size: int, target: str = "tokens", vocab_size: int | None = None):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if model.head not in ("v1", "v2"):
            raise ValueError(f"model.head must be 'v1' or 'v2', got {model.head!r}")
        if target != "pixels" and not vocab_size:
            raise ValueError(f"target {target!r} needs the tokenizer's vocab_size")
        self.cfg = model
        self.target = target
        self.kwargs = encoder_kwargs(model, img_size)
        self.encoder = Beit(**self.kwargs)
        dim = model.dim
        self.patch = model.patch
        self.grid = self.encoder.patch_embed.grid_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token, std=0.02)
        out = 3 * model.patch**2 if target == "pixels" else int(vocab_size)
        self.head = nn.Linear(dim, out)  # shared by the v2 aggregation head, as BEiT v2's shared_lm_head
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

        self.v2_layer = None
        if model.head == "v2":
            self.v2_layer = model.v2_layer or max(1, (3 * model.depth) // 4)
            if not 1 <= self.v2_layer <= model.depth:
                raise ValueError(f"model.v2_layer must be in [1, {model.depth}], got {self.v2_layer}")
            n = max(model.depth, self.v2_layer + model.v2_blocks)
            dpr = torch.linspace(0, model.drop_path, n).tolist()
            self.cls_pt_blocks = nn.ModuleList(
                Block(dim=dim, num_heads=model.heads, qkv_bias=model.qkv_bias, mlp_ratio=model.mlp_ratio,
                      drop_path=dpr[self.v2_layer + i], init_values=model.layer_scale or None, window_size=None)
                for i in range(model.v2_blocks)
            )
            for i, blk in enumerate(self.cls_pt_blocks):
                blk.apply(self._init_linear)
                scale = math.sqrt(2.0 * (self.v2_layer + i + 1))  # BEiT's depth-scaled init
                with torch.no_grad():
                    blk.attn.proj.weight.div_(scale)
                    blk.mlp.fc2.weight.div_(scale)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def compile_blocks(self) -> None:
        """``torch.compile`` each transformer block in place (regional compilation).

        Blocks only: the head's masked-position indexing has a data-dependent shape that would split a
        whole-model graph. Blocks with the same drop-path rate share one compiled graph; with drop path
        (the base recipes) every block has its own rate and graph, so dynamo's recompile limit (8) is
        raised to the number of blocks, or the blocks past it would silently run eager. Parameter
        names, checkpoints and DDP are unchanged.
        """
        import torch._dynamo

        blocks = list(self.encoder.blocks) + list(getattr(self, "cls_pt_blocks", []))
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(config, name, max(getattr(config, name), len(blocks) + 1))
        for blk in blocks:
            blk.compile()

    def no_weight_decay(self) -> set[str]:
        """Names of parameters AdamW must not decay: norms, biases, position tables, mask/cls tokens."""
        skip = {"mask_token", "encoder.cls_token", "encoder.pos_embed"}
        out = set()
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.endswith(".bias") or name in skip or "relative_position_bias_table" in name:
                out.add(name)
        return out

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tokens after the final norm, ``[B, 1 + N, D]``; v2 also returns its aggregation tokens.

        ``mask``: bool ``[B, N]`` (or ``[B, h, w]``); True replaces that patch's embedding by the mask token.
        """
        enc = self.encoder
        x = enc.patch_embed(images)
        if mask is not None:
            m = mask.reshape(x.shape[0], -1, 1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        x = torch.cat((enc.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        x = enc.pos_drop(x)
        rel_pos_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        early = None
        for i, blk in enumerate(enc.blocks):
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
            if self.v2_layer is not None and i + 1 == self.v2_layer:
                early = x[:, 1:]
        out = {"tokens": enc.norm(x)}
        if self.v2_layer is not None:
            y = torch.cat((x[:, :1], early), dim=1)  # last-layer [CLS] + intermediate patch tokens
            for blk in self.cls_pt_blocks:
                y = blk(y, shared_rel_pos_bias=rel_pos_bias)
            out["cls_pt"] = enc.norm(y)  # shared norm and head (BEiT v2 shared_lm_head=True)
        return out

    def forward_head(self, features: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs at masked positions only: ``[M, vocab]`` logits (or ``[M, p*p*3]`` pixels)."""
        m = mask.reshape(mask.shape[0], -1)
        out = {"mim": self.head(features["tokens"][:, 1:][m])}
        if "cls_pt" in features:
            out["cls_pt"] = self.head(features["cls_pt"][:, 1:][m])
        return out

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs at the masked positions (``forward_head(forward_features(...))``)."""
        return self.forward_head(self.forward_features(images, mask), mask)

    def pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        """MAE's target: each patch's pixels ``[B, N, p*p*3]``, normalised by the patch's own mean/var."""
        p = self.patch
        b, c, hh, ww = images.shape
        x = images.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        return (x - mean) / (var + 1e-6).sqrt()

    def forward(self, images: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training step's forward: ``loss`` (summed over heads) on masked positions only, and
        ``correct``/``count`` (masked positions whose token the MIM head got right / all of them)."""
        m = mask.reshape(mask.shape[0], -1)
        out = self.predict(images, m)
        if self.target == "pixels":
            target = self.pixel_targets(images)[m].float()
            losses = {k: F.mse_loss(v.float(), target) for k, v in out.items()}
            correct = torch.zeros((), device=images.device)
        else:
            if tokens is None:
                raise ValueError("token targets missing")
            target = tokens.reshape(tokens.shape[0], -1)[m].long()
            losses = {k: F.cross_entropy(v.float(), target) for k, v in out.items()}
            correct = (out["mim"].argmax(-1) == target).sum()
        result = {"loss": sum(losses.values()), "correct": correct.detach(),
                  "count": m.sum()}
        result.update({f"loss_{k}": v.detach() for k, v in losses.items()})
        return result


def build_model(model: ModelConfig, img_size: int, target: str, vocab_size: int | None) -> MIMModel:
    return MIMModel(model, img_size, target, vocab_size)


__all__ = ["MIMModel", "ModelConfig", "TARGETS", "build_model", "encoder_kwargs"]
