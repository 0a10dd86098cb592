"""Checkpoints in the layout of the released tokenizers, and reference forwards in plain functional torch.

DALL-E: modules of classes named ``dall_e.encoder.Encoder`` etc. (registered under those module names in
``sys.modules``, so the pickles name them as the released ``encoder.pkl`` does), saved whole with the legacy
``torch.save`` format. BEiT v2: ``torch.save({'model': state_dict})`` with the released key names.
Random weights, small widths; the structure and names are the released ones.
"""

from __future__ import annotations

import math
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# --- DALL-E: module classes under the released names ---------------------------------------------------
def _module(name: str) -> types.ModuleType:
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    return sys.modules[name]


class Conv2d(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True):
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
        self.device, self.requires_grad = torch.device("cpu"), False
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(0.1 * torch.randn(n_out))


def _block(cls, n_in: int, n_out: int, n_layers: int, kernels) -> nn.Module:
    blk = cls()
    blk.n_in, blk.n_out, blk.n_layers, blk.n_hid = n_in, n_out, n_layers, n_out // 4
    blk.post_gain = 1 / n_layers**2
    blk.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
    chans = [n_in, n_out // 4, n_out // 4, n_out // 4, n_out]
    items = []
    for i, k in enumerate(kernels):
        items += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(chans[i], chans[i + 1], k))]
    blk.res_path = nn.Sequential(OrderedDict(items))
    return blk


class EncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()


class DecoderBlock(nn.Module):
    def __init__(self):
        super().__init__()


class Encoder(nn.Module):
    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192):
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.vocab_size, self.input_channels = n_hid, n_blk_per_group, vocab_size, 3
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        n_layers, groups, prev = 4 * n_blk_per_group, [("input", Conv2d(3, n_hid, 7))], n_hid
        for g, w in enumerate([1, 2, 4, 8], start=1):
            items = [(f"block_{i + 1}", _block(EncoderBlock, prev if i == 0 else w * n_hid, w * n_hid, n_layers, (3, 3, 3, 1)))
                     for i in range(n_blk_per_group)]
            if g < 4:
                items.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(items))))
            prev = w * n_hid
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                             ("conv", Conv2d(8 * n_hid, vocab_size, 1, False))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))


class Decoder(nn.Module):
    def __init__(self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192):
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group, self.vocab_size = n_init, n_hid, n_blk_per_group, vocab_size
        self.output_channels, self.device, self.requires_grad = 3, torch.device("cpu"), False
        n_layers, groups, prev = 4 * n_blk_per_group, [("input", Conv2d(vocab_size, n_init, 1, False))], n_init
        for g, w in enumerate([8, 4, 2, 1], start=1):
            items = [(f"block_{i + 1}", _block(DecoderBlock, prev if i == 0 else w * n_hid, w * n_hid, n_layers, (1, 3, 3, 3)))
                     for i in range(n_blk_per_group)]
            if g < 4:
                items.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(items))))
            prev = w * n_hid
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(n_hid, 6, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))


for _cls, _mod in ((Conv2d, "dall_e.utils"), (EncoderBlock, "dall_e.encoder"), (Encoder, "dall_e.encoder"),
                   (DecoderBlock, "dall_e.decoder"), (Decoder, "dall_e.decoder")):
    _module("dall_e")
    _cls.__module__ = _mod
    setattr(_module(_mod), _cls.__name__, _cls)


def save_dalle(path: Path, module: nn.Module, legacy: bool = True) -> Path:
    """Saved as the released files were: the whole module, legacy torch.save format."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "couldn't retrieve source code" for the test classes
        torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    return path


def dalle_reference_logits(enc: dict[str, torch.Tensor], x: torch.Tensor, n_blk: int) -> torch.Tensor:
    """The reference encoder forward on [0, 1] pixels, from the state dict (functional)."""
    x = (1 - 2 * 0.1) * x + 0.1  # map_pixels

    def conv(h, key):
        w = enc[f"{key}.w"]
        return F.conv2d(h, w, enc[f"{key}.b"], padding=(w.shape[-1] - 1) // 2)

    x = conv(x, "blocks.input")
    for g in range(1, 5):
        for i in range(1, n_blk + 1):
            p = f"blocks.group_{g}.block_{i}"
            idp = conv(x, f"{p}.id_path") if f"{p}.id_path.w" in enc else x
            r = x
            for c in range(1, 5):
                r = conv(F.relu(r), f"{p}.res_path.conv_{c}")
            x = idp + (1 / (4 * n_blk) ** 2) * r
        if g < 4:
            x = F.max_pool2d(x, 2)
    return conv(F.relu(x), "blocks.output.conv")


def dalle_reference_decode(dec: dict[str, torch.Tensor], tokens: torch.Tensor, n_blk: int, vocab: int) -> torch.Tensor:
    def conv(h, key):
        w = dec[f"{key}.w"]
        return F.conv2d(h, w, dec[f"{key}.b"], padding=(w.shape[-1] - 1) // 2)

    x = conv(F.one_hot(tokens, vocab).permute(0, 3, 1, 2).float(), "blocks.input")
    for g in range(1, 5):
        for i in range(1, n_blk + 1):
            p = f"blocks.group_{g}.block_{i}"
            idp = conv(x, f"{p}.id_path") if f"{p}.id_path.w" in dec else x
            r = x
            for c in range(1, 5):
                r = conv(F.relu(r), f"{p}.res_path.conv_{c}")
            x = idp + (1 / (4 * n_blk) ** 2) * r
        if g < 4:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
    stats = conv(F.relu(x), "blocks.output.conv")
    return torch.clamp((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8, 0, 1)


# --- BEiT v2 VQ-KD: the released state-dict layout ----------------------------------------------------
def beitv2_state_dict(dim: int = 768, depth: int = 12, grid: int = 14, patch: int = 16, vocab: int = 8192,
                      code_dim: int = 32, mlp_ratio: float = 4.0, dec_depth: int = 1, teacher_dim: int = 512,
                      device: str = "cpu", seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Every tensor of a released ``vqkd_encoder_base_decoder_{dec_depth}x768x12_*`` 'model' dict."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * std

    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    hidden = int(dim * mlp_ratio)

    def vit(prefix, n_blocks, in_chans, p, n):
        sd[f"{prefix}.cls_token"] = rnd(1, 1, dim)
        sd[f"{prefix}.pos_embed"] = rnd(1, n + 1, dim)
        sd[f"{prefix}.patch_embed.proj.weight"] = rnd(dim, in_chans, p, p, std=0.1)
        sd[f"{prefix}.patch_embed.proj.bias"] = rnd(dim)
        for i in range(n_blocks):
            b = f"{prefix}.blocks.{i}"
            sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"] = 1 + rnd(dim, std=0.1), rnd(dim)
            sd[f"{b}.attn.q_bias"], sd[f"{b}.attn.v_bias"] = rnd(dim), rnd(dim)
            sd[f"{b}.attn.qkv.weight"] = rnd(3 * dim, dim, std=0.2)
            sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"] = rnd(dim, dim, std=0.2), rnd(dim)
            sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"] = 1 + rnd(dim, std=0.1), rnd(dim)
            sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"] = rnd(hidden, dim, std=0.2), rnd(hidden)
            sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"] = rnd(dim, hidden, std=0.2), rnd(dim)
        sd[f"{prefix}.fc_norm.weight"], sd[f"{prefix}.fc_norm.bias"] = 1 + rnd(dim, std=0.1), rnd(dim)

    vit("encoder", depth, 3, patch, grid * grid)
    vit("decoder", dec_depth, code_dim, 1, grid * grid)
    for name, (i, o) in (("encode_task_layer", (dim, code_dim)), ("decode_task_layer", (dim, teacher_dim))):
        sd[f"{name}.0.weight"], sd[f"{name}.0.bias"] = rnd(dim, dim, std=0.2), rnd(dim)
        sd[f"{name}.2.weight"], sd[f"{name}.2.bias"] = rnd(o, i, std=0.2), rnd(o)
    if device == "meta":
        codebook = torch.empty(vocab, code_dim, device="meta")
    else:
        # EMA rows are close to, not exactly, unit length: scale them so renormalising would change ids
        codebook = F.normalize(torch.randn(vocab, code_dim, generator=g), dim=-1)
        codebook = codebook * (0.6 + 0.8 * torch.rand(vocab, 1, generator=g))
    sd["quantize.embedding.weight"] = codebook
    sd["quantize.embedding.cluster_size"] = rnd(vocab)
    sd["quantize.embedding.embed_avg"] = rnd(vocab, code_dim)
    sd["quantize.embedding.initted"] = torch.ones(1, device=device)
    sd["quantize.cluster_size"] = rnd(vocab)
    return sd


def beitv2_reference_ids(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference get_codebook_indices on [0, 1] pixels (functional), ids ``[B, N]``."""
    data = x * 255.0 if x.max() <= 1.0 else x
    data = data / 127.5 - 1.0
    w = sd["encoder.patch_embed.proj.weight"]
    h = F.conv2d(data, w, sd["encoder.patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    b = h.shape[0]
    h = torch.cat((sd["encoder.cls_token"].expand(b, -1, -1), h), dim=1) + sd["encoder.pos_embed"]
    dim = h.shape[-1]
    i = 0
    while f"encoder.blocks.{i}.norm1.weight" in sd:
        p = f"encoder.blocks.{i}"
        y = F.layer_norm(h, (dim,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], eps=1e-6)
        bias = torch.cat((sd[f"{p}.attn.q_bias"], torch.zeros_like(sd[f"{p}.attn.v_bias"]), sd[f"{p}.attn.v_bias"]))
        qkv = F.linear(y, sd[f"{p}.attn.qkv.weight"], bias).reshape(b, h.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // heads) ** -0.5, qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = F.linear((att @ v).transpose(1, 2).reshape(b, h.shape[1], -1), sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = h + y
        y = F.layer_norm(h, (dim,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
                     sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        h = h + y
        i += 1
    t = F.layer_norm(h[:, 1:], (dim,), sd["encoder.fc_norm.weight"], sd["encoder.fc_norm.bias"], eps=1e-6)
    t = F.linear(torch.tanh(F.linear(t, sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"])),
                 sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"])
    z = F.normalize(t, p=2, dim=-1).reshape(-1, t.shape[-1])
    e = sd["quantize.embedding.weight"]
    d = z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", z, e)
    return d.argmin(dim=1).view(b, -1)
