"""OpenAI's DALL-E dVAE (the tokenizer of BEiT v1), rebuilt from its published architecture.

Encoder: a 7x7 input conv, 4 groups of ``n_blk_per_group`` residual blocks (widths 1, 2, 4, 8 x ``n_hid``;
a 2x2 max-pool after each of the first three groups), ReLU, a 1x1 conv to the vocabulary's logits;
tokens are the argmax. A block is ``id_path(x) + post_gain * res_path(x)`` with
``post_gain = 1 / (4 * n_blk_per_group)^2``. Pixels in [0, 1] go through ``map_pixels``
(``(1 - 2 eps) x + eps``, eps 0.1) first. The decoder mirrors it with nearest 2x upsampling and outputs
6 channels (logit-Laplace statistics); the image is ``unmap_pixels(sigmoid(first 3 channels))``.

Parameter names equal the released ``encoder.pkl``/``decoder.pkl`` module trees (``blocks.group_1.block_1.
res_path.conv_1.w``), prefixed ``encoder.``/``decoder.``. Convolutions run in fp32 (the reference runs
fp16 convs on GPU).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.base import Tokenizer, TokenizerConfig

LOGIT_LAPLACE_EPS = 0.1
GROUPS = 4


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv(nn.Module):
    """DALL-E's conv: parameters ``w`` ``[out, in, k, k]`` and ``b``, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))
        self.pad = (kw - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.pad)


class ResBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        chans = [n_in, hid, hid, hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv(chans[i], chans[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(blocks: list[nn.Module], tail: tuple[str, nn.Module] | None) -> nn.Sequential:
    items = [(f"block_{i + 1}", b) for i, b in enumerate(blocks)]
    return nn.Sequential(OrderedDict(items + ([tail] if tail else [])))


class DalleEncoder(nn.Module):
    def __init__(self, n_hid: int, n_blk: int, vocab: int):
        super().__init__()
        n_layers = GROUPS * n_blk
        groups: list[tuple[str, nn.Module]] = [("input", Conv(3, n_hid, 7))]
        prev = n_hid
        for g, w in enumerate([1, 2, 4, 8], start=1):
            blocks = [ResBlock(prev if i == 0 else w * n_hid, w * n_hid, n_layers, (3, 3, 3, 1)) for i in range(n_blk)]
            groups.append((f"group_{g}", _group(blocks, ("pool", nn.MaxPool2d(2)) if g < GROUPS else None)))
            prev = w * n_hid
        groups.append(("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv(8 * n_hid, vocab, 1)))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DalleDecoder(nn.Module):
    def __init__(self, n_init: int, n_hid: int, n_blk: int, vocab: int):
        super().__init__()
        n_layers, widths = GROUPS * n_blk, [8, 4, 2, 1]
        groups: list[tuple[str, nn.Module]] = [("input", Conv(vocab, n_init, 1))]
        prev = n_init
        for g, w in enumerate(widths, start=1):
            blocks = [ResBlock(prev if i == 0 else w * n_hid, w * n_hid, n_layers, (1, 3, 3, 3)) for i in range(n_blk)]
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < GROUPS else None
            groups.append((f"group_{g}", _group(blocks, up)))
            prev = w * n_hid
        groups.append(("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv(n_hid, 6, 1)))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, h, w]`` -> logit-Laplace statistics ``[B, 6, H, W]``."""
        conv = self.blocks.input
        # the input conv of a one-hot map is a column look-up (+ bias): no [B, vocab, h, w] tensor
        x = conv.w[:, :, 0, 0].t()[tokens].permute(0, 3, 1, 2) + conv.b.view(1, -1, 1, 1)
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x


class DalleDVAE(Tokenizer):
    """The released DALL-E dVAE behind mimflow's ``Tokenizer`` interface (kind ``dvae``, arch ``dall-e``)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        if config.kind != "dvae" or config.arch != "dall-e":
            raise ValueError(f"DalleDVAE needs kind 'dvae' and arch 'dall-e', got {config.kind!r}/{config.arch!r}")
        if config.patch_size != 2 ** (GROUPS - 1):
            raise ValueError(f"dall-e: input_size / grid must be {2 ** (GROUPS - 1)} (3 max-pools), got {config.patch_size}")
        self.encoder = DalleEncoder(config.width, config.depth, config.vocab_size)
        self.decoder = (
            DalleDecoder(config.code_dim, config.decoder_width, config.decoder_depth, config.vocab_size)
            if config.decoder_depth > 0 else None
        )

    @property
    def can_decode(self) -> bool:
        return self.decoder is not None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # exactly the reference's map_pixels (config mean/std hold the same map, for the record)
        return map_pixels(self.check_images(images).float())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "the dall-e dvae assigns tokens by argmax over logits, not by nearest code vector: "
            "it has no code-space features to re-assign"
        )

    def codebook(self) -> torch.Tensor:
        if self.decoder is None:
            raise NotImplementedError("dall-e imported without its decoder: no code embedding (import with --decoder)")
        return self.decoder.blocks.input.w[:, :, 0, 0].t()  # [K, n_init]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise NotImplementedError("dall-e imported without its decoder: import with --decoder decoder.pkl to decode")
        stats = self.decoder.forward_codes(self.check_tokens(tokens)).float()
        return unmap_pixels(torch.sigmoid(stats[:, :3]))
