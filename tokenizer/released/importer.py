"""``mimflow tokenizer import KIND CHECKPOINT --out DIR``: a released checkpoint -> a mimflow tokenizer dir.

The hyper-parameters are recognised from tensor shapes (checked against a model built on the meta
device, so the check costs no memory at full size); what cannot be read from shapes has the released
value as default (DALL-E input 112 px as BEiT v1 feeds it; heads = width / 64).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenizer.base import TokenizerConfig, TokenizerLoadError

KINDS = ("dalle-dvae", "beitv2-vqkd")
DALLE_INPUT_SIZE = 112  # BEiT v1 tokenizes 112 px views with the DALL-E encoder (14 x 14 tokens)
# map_pixels (x * 0.8 + 0.1) written as (x - mean) / std, for config.json; the model computes map_pixels itself
DALLE_MEAN, DALLE_STD = (-0.125,) * 3, (1.25,) * 3
BEITV2_MEAN, BEITV2_STD = (0.5,) * 3, (0.5,) * 3  # x * 255 / 127.5 - 1
BEITV2_PREFIXES = ("encoder.", "encode_task_layer.")
BEITV2_CODEBOOK = "quantize.embedding.weight"


@dataclass
class Recognised:
    config: TokenizerConfig
    tensors: dict[str, torch.Tensor]  # named as the mimflow model's state_dict
    source: str  # what the checkpoint turned out to be

    def describe(self) -> list[str]:
        c = self.config
        arch = {
            "dall-e": f"DALL-E dVAE encoder (n_hid {c.width}, {c.depth} blocks/group, 4 groups)"
            + (f" + decoder (n_init {c.code_dim}, n_hid {c.decoder_width}, {c.decoder_depth} blocks/group)"
               if c.decoder_depth else ", no decoder"),
            "beitv2": f"BEiT v2 VQ-KD ViT encoder (width {c.width}, depth {c.depth}, heads {c.num_heads}, "
            f"mlp {c.mlp_ratio:g}x, patch {c.patch_size}) + 3-layer task head to {c.code_dim}-d codes",
        }[c.arch]
        prep = {
            "dall-e": "[0,1] -> map_pixels: 0.8 x + 0.1 (logit-Laplace eps 0.1); tokens = argmax of logits",
            "beitv2": "[0,1] -> x * 255 / 127.5 - 1; tokens = nearest stored code (squared L2) to the "
            "l2-normalised features",
        }[c.arch]
        params = sum(t.numel() for t in self.tensors.values())
        return [
            f"source: {self.source}",
            f"architecture: {arch}",
            f"kind: {c.kind} (arch {c.arch}), vocabulary: {c.vocab_size}, grid: {c.grid}x{c.grid}, "
            f"input size: {c.input_size}px",
            f"preprocessing: {prep}",
            f"parameters: {params / 1e6:.2f}M",
        ]


def _what(obj: Any) -> str:
    from tokenizer.safe_unpickle import Record

    if isinstance(obj, Record):
        return f"a pickled {obj.qualname} module"
    if isinstance(obj, dict):
        keys = list(obj)[:5]
        return f"a dict with keys {keys}{' ...' if len(obj) > 5 else ''}"
    return f"a {type(obj).__name__}"


def _count(prefix: str, keys: set[str], suffix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return len(found)


def _need(sd: dict[str, torch.Tensor], key: str, where: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise TokenizerLoadError(f"{where}: missing tensor {key!r}")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise TokenizerLoadError(f"{where}: tensor {key!r} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


# --- DALL-E ---------------------------------------------------------------------------------------
def _dalle_part(obj: Any, path: str, cls: str) -> tuple[dict[str, torch.Tensor], int]:
    from tokenizer.safe_unpickle import Record, module_state

    if not isinstance(obj, Record) or obj.qualname != cls:
        raise TokenizerLoadError(f"{path} is not a DALL-E {cls.rsplit('.', 1)[-1].lower()}: it holds {_what(obj)}, "
                                 f"expected a pickled {cls} module")
    sd = module_state(obj)
    n_blk = _count("blocks.group_1.block_", set(sd), ".res_path.conv_1.w")
    if n_blk < 1:
        raise TokenizerLoadError(f"{path}: {cls} has no blocks.group_1.block_<i> residual blocks")
    return sd, n_blk


def recognise_dalle(enc: dict[str, torch.Tensor], n_blk: int, input_size: int, where: str,
                    dec: dict[str, torch.Tensor] | None = None, dec_blk: int = 0, dec_where: str = "") -> TokenizerConfig:
    """Config from the encoder's (and decoder's) tensor shapes; shapes only, so meta tensors work."""
    n_hid = _need(enc, "blocks.input.w", where, 4)[0]
    vocab = _need(enc, "blocks.output.conv.w", where, 4)[0]
    n_init = dec_hid = 0
    if dec is not None:
        n_init, dec_vocab = _need(dec, "blocks.input.w", dec_where, 4)[:2]
        dec_hid = _need(dec, "blocks.output.conv.w", dec_where, 4)[1]
        if dec_vocab != vocab:
            raise TokenizerLoadError(f"{dec_where}: decoder vocabulary {dec_vocab} does not match the encoder's {vocab}")
    if input_size % 8:
        raise TokenizerLoadError(f"--input-size {input_size}: the DALL-E encoder downsamples 8x, use a multiple of 8")
    try:
        return TokenizerConfig(kind="dvae", arch="dall-e", vocab_size=vocab, grid=input_size // 8,
                               input_size=input_size, mean=DALLE_MEAN, std=DALLE_STD, width=n_hid, depth=n_blk,
                               code_dim=max(n_init, 1), decoder_width=dec_hid, decoder_depth=dec_blk)
    except ValueError as e:
        raise TokenizerLoadError(f"{where}: {e}") from None


# --- BEiT v2 --------------------------------------------------------------------------------------
def _beitv2_state(obj: Any, path: str) -> dict[str, torch.Tensor]:
    sd = None
    if isinstance(obj, dict):
        sd = obj.get("model", obj.get("state_dict"))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TokenizerLoadError(f"{path} is not a BEiT v2 VQ-KD checkpoint: it holds {_what(obj)}, expected a dict "
                                 f"with a 'model' state dict")
    if BEITV2_CODEBOOK not in sd or "encoder.patch_embed.proj.weight" not in sd:
        raise TokenizerLoadError(f"{path} is not a BEiT v2 VQ-KD checkpoint: its state dict has no "
                                 f"{'encoder.patch_embed.proj.weight' if BEITV2_CODEBOOK in sd else BEITV2_CODEBOOK!r} "
                                 f"(keys start {list(sd)[:4]})")
    return sd


def recognise_beitv2(sd: dict[str, torch.Tensor], where: str, num_heads: int | None = None) -> TokenizerConfig:
    """Config from the state dict's tensor shapes (meta tensors work)."""
    keys = set(sd)
    for bad, what in (("encoder.norm.weight", "a final norm instead of fc_norm (use_mean_pooling=False)"),
                      ("encoder.blocks.0.gamma_1", "layer scale (gamma_1)"),
                      ("encoder.rel_pos_bias.relative_position_bias_table", "relative position bias"),
                      ("encoder.blocks.0.attn.relative_position_bias_table", "relative position bias")):
        if bad in keys:
            raise TokenizerLoadError(f"{where}: the encoder has {what}; the released VQ-KD tokenizers do not")
    dim, _, p, p2 = _need(sd, "encoder.patch_embed.proj.weight", where, 4)
    n = _need(sd, "encoder.pos_embed", where, 3)[1] - 1
    grid = math.isqrt(max(n, 0))
    if grid * grid != n or p != p2:
        raise TokenizerLoadError(f"{where}: encoder.pos_embed holds {n} patch positions (+1 [CLS]), not a square grid")
    depth = _count("encoder.blocks.", keys, ".norm1.weight")
    hidden = _need(sd, "encoder.blocks.0.mlp.fc1.weight", where, 2)[0] if depth else 4 * dim
    vocab, code_dim = _need(sd, BEITV2_CODEBOOK, where, 2)
    heads = num_heads or (dim // 64 if dim % 64 == 0 else 0)
    if not heads:
        raise TokenizerLoadError(f"{where}: width {dim} is not a multiple of 64: give --num-heads")
    try:
        return TokenizerConfig(kind="vqkd", arch="beitv2", vocab_size=vocab, grid=grid, input_size=grid * p,
                               mean=BEITV2_MEAN, std=BEITV2_STD, width=dim, depth=depth, num_heads=heads,
                               mlp_ratio=hidden / dim, code_dim=code_dim)
    except ValueError as e:
        raise TokenizerLoadError(f"{where}: {e}") from None


# --- common ---------------------------------------------------------------------------------------
def check_tensors(config: TokenizerConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """One line naming the first tensor that a model of ``config`` does not have, lacks, or shapes otherwise."""
    from tokenizer.released import build_released

    with torch.device("meta"):  # shapes only: no memory even at the released sizes
        expected = {k: tuple(v.shape) for k, v in build_released(config).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise TokenizerLoadError(f"{where}: missing tensor {missing[0]!r}{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''} "
                                 f"that a {config.arch} tokenizer of the recognised shape needs")
    if unexpected:
        raise TokenizerLoadError(f"{where}: unexpected tensor {unexpected[0]!r}"
                                 f"{f' (+{len(unexpected) - 1} more)' if len(unexpected) > 1 else ''} for a {config.arch} tokenizer")
    for k, want in expected.items():
        if tuple(tensors[k].shape) != want:
            raise TokenizerLoadError(f"{where}: tensor {k!r} has shape {list(tensors[k].shape)}, but width "
                                     f"{config.width} / depth {config.depth} / vocab {config.vocab_size} implies {list(want)}")
        if not tensors[k].is_floating_point():
            raise TokenizerLoadError(f"{where}: tensor {k!r} has dtype {tensors[k].dtype}, expected floating point")


def recognise(kind: str, checkpoint: str | Path, decoder: str | Path | None = None, input_size: int | None = None,
              num_heads: int | None = None) -> Recognised:
    """Read a released checkpoint safely and say what it is."""
    from tokenizer.safe_unpickle import load_checkpoint_file

    path = str(checkpoint)
    if kind not in KINDS:
        raise TokenizerLoadError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "dalle-dvae":
        enc, n_blk = _dalle_part(load_checkpoint_file(path), path, "dall_e.encoder.Encoder")
        dec, dec_blk, dec_path = None, 0, str(decoder or "")
        if decoder is not None:
            dec, dec_blk = _dalle_part(load_checkpoint_file(dec_path), dec_path, "dall_e.decoder.Decoder")
        config = recognise_dalle(enc, n_blk, input_size or DALLE_INPUT_SIZE, path, dec, dec_blk, dec_path)
        tensors = {f"encoder.{k}": v for k, v in enc.items()}
        tensors.update({f"decoder.{k}": v for k, v in (dec or {}).items()})
        source = f"DALL-E encoder {path}" + (f" + decoder {dec_path}" if dec else "")
    else:
        if decoder is not None:
            raise TokenizerLoadError("--decoder is for dalle-dvae; a VQ-KD tokenizer cannot decode to pixels")
        sd = _beitv2_state(load_checkpoint_file(path), path)
        config = recognise_beitv2(sd, path, num_heads)
        if input_size and input_size != config.input_size:
            raise TokenizerLoadError(f"{path}: position embeddings are for {config.input_size}px inputs, not --input-size {input_size}")
        tensors = {k: v for k, v in sd.items() if k.startswith(BEITV2_PREFIXES) or k == BEITV2_CODEBOOK}
        source = f"BEiT v2 VQ-KD {path} ({len(sd) - len(tensors)} training-only tensors left out: decoder, EMA statistics)"
    check_tensors(config, tensors, path)
    return Recognised(config, {k: v.float().contiguous() for k, v in tensors.items()}, source)


def import_released(kind: str, checkpoint: str | Path, out: str | Path, decoder: str | Path | None = None,
                    input_size: int | None = None, num_heads: int | None = None) -> str:
    """Write the tokenizer directory (config.json + model.safetensors); returns its ``tokenizer_id``."""
    from tokenizer.checkpoint import save_tokenizer
    from tokenizer.released import build_released

    rec = recognise(kind, checkpoint, decoder, input_size, num_heads)
    tok = build_released(rec.config)
    tok.load_state_dict(rec.tensors, strict=True)
    return save_tokenizer(tok.eval(), out)
