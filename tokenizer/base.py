"""The tokenizer contract: its config and the common ``Tokenizer`` interface (checkpoints: ``tokenizer.checkpoint``).

A tokenizer checkpoint is a directory (local path or object-store URI) holding

* ``config.json`` — the ``TokenizerConfig`` (kind, vocab size, token grid, input size, normalisation
  and the model's hyperparameters), and
* ``model.safetensors`` — the weights needed to *encode* (and, for the dVAE, to decode); training-only
  state (EMA statistics, the VQ-KD decoder, optimiser) lives in the Ray Train checkpoints instead.

``tokenizer_id`` is a short sha256 over the tensors (sorted by name: name, dtype, shape, raw bytes)
and the canonical config JSON (sorted keys), so the same content gives the same id on any machine,
whatever the safetensors header's byte layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

from pipeline.config import ConfigError, Range

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ID_LENGTH = 16
MAX_VOCAB = 65536  # the token cache stores ids as uint16

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TokenizerLoadError(ConfigError):
    """A tokenizer checkpoint that cannot be loaded; the message names the file and field."""


@dataclass
class TokenizerConfig:
    """Everything needed to rebuild a tokenizer for encoding. Fields not used by a kind are ignored.

    ``width``/``depth``: VQ-KD — the ViT encoder's embedding dim and number of blocks; dVAE — the
    conv trunk's base channels and residual blocks per resolution. ``code_dim``: VQ-KD — dimension of
    the l2-normalised code space; dVAE — dimension of the decoder's code embedding.
    ``decoder_width``/``decoder_depth``: the VQ-KD training decoder (0 width = ``width``).
    """

    kind: Literal["dvae", "vqkd"] = "vqkd"
    vocab_size: int = 256
    grid: int = 8  # token grid side: h = w = grid
    input_size: int = 64  # the square image size the tokenizer sees, in pixels
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    width: int = 64
    depth: int = 2
    num_heads: Annotated[int, Range(ge=1)] = 4
    mlp_ratio: Annotated[float, Range(gt=0)] = 4.0
    code_dim: int = 32
    decoder_width: Annotated[int, Range(ge=0)] = 0
    decoder_depth: int = 1
    # Which implementation of the kind: mimflow's own, or an imported release (tokenizer/released/):
    # "dall-e" (OpenAI's dVAE; decoder_width/decoder_depth/code_dim then describe its decoder, depth 0 = none)
    # or "beitv2" (BEiT v2's VQ-KD ViT). Left out of config.json when "mimflow", so trained ids are unchanged.
    arch: Literal["mimflow", "dall-e", "beitv2"] = "mimflow"

    def __post_init__(self):
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if self.kind not in ("dvae", "vqkd"):
            raise ValueError(f"kind must be 'dvae' or 'vqkd', got {self.kind!r}")
        if not 2 <= self.vocab_size <= MAX_VOCAB:
            raise ValueError(f"vocab_size must be in [2, {MAX_VOCAB}] (tokens are stored as uint16), got {self.vocab_size}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.input_size < self.grid or self.input_size % self.grid:
            raise ValueError(f"input_size ({self.input_size}) must be a multiple of grid ({self.grid})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values each with std > 0, got {self.mean} / {self.std}")
        if self.width < 1 or self.depth < 0 or self.code_dim < 1:
            raise ValueError(f"width, code_dim must be >= 1 and depth >= 0 (got {self.width}, {self.code_dim}, {self.depth})")
        factor = self.input_size // self.grid
        if self.kind == "dvae" and factor & (factor - 1):
            raise ValueError(
                f"dvae: input_size / grid = {factor} must be a power of two (stride-2 stages), "
                f"got input_size {self.input_size}, grid {self.grid}"
            )
        if (self.kind, self.arch) in (("vqkd", "dall-e"), ("dvae", "beitv2")):
            raise ValueError(f"arch {self.arch!r} does not implement kind {self.kind!r}")
        if self.kind == "vqkd":
            if self.width % self.num_heads:
                raise ValueError(f"vqkd: width ({self.width}) must be divisible by num_heads ({self.num_heads})")
            if self.decoder_depth < 1:
                raise ValueError(f"vqkd: decoder_depth must be >= 1, got {self.decoder_depth}")

    @property
    def patch_size(self) -> int:
        return self.input_size // self.grid

    def canonical_json(self) -> str:
        return json.dumps(config_to_dict(self), sort_keys=True, separators=(",", ":"))


def config_to_dict(cfg: TokenizerConfig) -> dict:
    from pipeline.config import to_dict

    doc = to_dict(cfg)
    if doc.get("arch") == "mimflow":
        del doc["arch"]  # the default: configs (and ids) of trained tokenizers stay as they were
    return doc


class Tokenizer(nn.Module):
    """Common interface of the dVAE and the VQ-KD tokenizers.

    ``encode`` takes float images ``[B, 3, input_size, input_size]`` in [0, 1] (normalisation happens
    inside) and returns token ids ``[B, h, w]``.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    # --- description -------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid, self.config.grid)

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def tokenizer_id(self) -> str:
        return compute_tokenizer_id(self.export_state_dict(), self.config)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.export_state_dict().values())
        h, w = self.grid
        return (
            f"{self.kind} tokenizer: vocab {self.vocab_size}, grid {h}x{w}, input {self.input_size}px, "
            f"{params / 1e6:.2f}M parameters"
        )

    # --- preprocessing ------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"{self.kind} tokenizer takes images of shape [B, 3, {s}, {s}] (input_size {s}), got {shape}; "
                f"render views at input_size={s}"
            )
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        elif not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1] (or uint8), got dtype {images.dtype}")
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check_images(images)
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.pixel_std + self.pixel_mean).clamp(0.0, 1.0)

    # --- the interface ------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:  # [B, h, w] int64
        raise NotImplementedError

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:  # [B, h*w, D]
        raise NotImplementedError(f"{self.kind} tokenizer has no code-space features")

    def codebook(self) -> torch.Tensor:  # [K, D]
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.kind} tokenizer cannot decode tokens to pixels (only the dvae can)")

    @property
    def can_decode(self) -> bool:
        """Whether ``decode`` works (a dVAE imported without its decoder cannot)."""
        return type(self).decode is not Tokenizer.decode

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (h, w):
            raise ValueError(f"tokens must have shape [B, {h}, {w}], got {list(tokens.shape)}")
        tokens = tokens.long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that go to ``model.safetensors`` (persistent state only, contiguous, on CPU)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}

    def mark_loaded(self) -> None:
        """Called after weights are loaded from a checkpoint (the VQ-KD marks its codebook initialised)."""


# --- identity -----------------------------------------------------------------------------------
def compute_tokenizer_id(tensors: dict[str, torch.Tensor], config: TokenizerConfig) -> str:
    h = hashlib.sha256(b"mimflow-tokenizer-v1\0")
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + b"\0" + json.dumps(list(t.shape)).encode() + b"\0")
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(b"config\0" + config.canonical_json().encode())
    return h.hexdigest()[:ID_LENGTH]
