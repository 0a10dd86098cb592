"""Released tokenizers: safe reading of the published pickles, id-for-id parity with the reference forward,
the `tokenizer import` command, and the cache / pretraining built on an imported tokenizer."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from released_layouts import (  # noqa: E402
    Decoder,
    Encoder,
    beitv2_reference_ids,
    beitv2_state_dict,
    dalle_reference_decode,
    dalle_reference_logits,
    save_dalle,
)

from tokenizer.base import TokenizerLoadError  # noqa: E402
from tokenizer.checkpoint import load_tokenizer  # noqa: E402
from tokenizer.released.importer import check_tensors, import_released, recognise, recognise_beitv2, recognise_dalle  # noqa: E402
from tokenizer.safe_unpickle import UnsafeCheckpointError, load_checkpoint_file, module_state  # noqa: E402

HEADS = 2


def _dalle_files(root: Path, legacy: bool = True, seed: int = 0) -> tuple[Encoder, Decoder]:
    torch.manual_seed(seed)
    enc, dec = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=64), Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=64)
    save_dalle(root / "encoder.pkl", enc, legacy)
    save_dalle(root / "decoder.pkl", dec, legacy)
    return enc, dec


def _vqkd_file(root: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = beitv2_state_dict(dim=32, depth=2, grid=4, patch=8, vocab=128, code_dim=8, teacher_dim=16, seed=seed)
    torch.save({"model": sd}, root / "vqkd.pth")
    return sd


# --- reading pickles without running them ---------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain-pickle"])
def test_a_pickle_with_a_reduce_payload_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.zeros(2)}, "args": _Payload(marker)}
    if fmt == "plain-pickle":  # not a torch.save file at all: still read only through the allow-list
        path.write_bytes(pickle.dumps({"model": {}, "args": _Payload(marker)}, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle global '(posix|os)\.system'") as e:
        load_checkpoint_file(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    # the same payload through the CLI: a one-line error, exit code 2, nothing run
    from mimflow.cli import main

    assert main(["tokenizer", "import", "beitv2-vqkd", str(path), "--out", str(tmp_path / "tok")]) == 2
    assert not marker.exists() and not (tmp_path / "tok").exists()


def test_module_pickles_in_both_formats_read_as_records_with_the_released_names(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=64)
    for legacy in (True, False):
        rec = load_checkpoint_file(save_dalle(tmp_path / f"enc-{legacy}.pkl", enc, legacy))
        assert rec.qualname == "dall_e.encoder.Encoder" and rec.n_hid == 8
        sd = module_state(rec)
        assert sd.keys() == enc.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in enc.state_dict().items())
        assert "blocks.group_2.block_1.id_path.w" in sd and "blocks.group_1.block_1.res_path.conv_4.w" in sd


def test_an_unknown_module_class_is_refused(tmp_path):
    class Thing(torch.nn.Module):
        pass

    Thing.__module__, Thing.__qualname__ = "evil.nets", "Thing"
    sys.modules.setdefault("evil", type(sys)("evil"))
    sys.modules.setdefault("evil.nets", type(sys)("evil.nets")).Thing = Thing
    save_dalle(tmp_path / "thing.pkl", Thing())
    with pytest.raises(UnsafeCheckpointError, match="'evil.nets.Thing'"):
        load_checkpoint_file(tmp_path / "thing.pkl")


# --- parity with the reference forward ------------------------------------------------------------
@pytest.mark.parametrize("legacy", [True, False])
def test_dalle_import_encodes_and_decodes_like_the_reference(tmp_path, legacy):
    enc, dec = _dalle_files(tmp_path, legacy)
    tid = import_released("dalle-dvae", tmp_path / "encoder.pkl", tmp_path / "tok", tmp_path / "decoder.pkl", input_size=32)
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.tokenizer_id == tid and (tok.kind, tok.config.arch, tok.grid, tok.vocab_size) == ("dvae", "dall-e", (4, 4), 64)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = dalle_reference_logits(enc.state_dict(), x, 1).argmax(dim=1)
    ids = tok.encode(x)
    assert len(ref.unique()) > 3  # a spread of ids, not one constant
    assert torch.equal(ids, ref)
    assert torch.allclose(tok.decode(ids), dalle_reference_decode(dec.state_dict(), ids, 1, 64), atol=1e-6)
    assert tok.codebook().shape == (64, 8)


def test_dalle_without_decoder_encodes_and_refuses_to_decode(tmp_path):
    enc, _ = _dalle_files(tmp_path)
    import_released("dalle-dvae", tmp_path / "encoder.pkl", tmp_path / "tok", input_size=32)
    tok = load_tokenizer(tmp_path / "tok")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(tok.encode(x), dalle_reference_logits(enc.state_dict(), x, 1).argmax(dim=1))
    assert not tok.can_decode
    with pytest.raises(NotImplementedError, match="--decoder"):
        tok.decode(tok.encode(x))
    # `tokens show` on its cache draws images and token maps, without a decoded column
    from cache_fixture import write_cache
    from tokenizer.cache_show import show_rows

    cache = str(tmp_path / "tokens" / tok.tokenizer_id)
    write_cache(cache, tok, "shapes?n=4&size=40&seed=1", [4])
    rows = show_rows(cache, n=2, tokenizer_dir=str(tmp_path / "tok"))
    assert len(rows) == 2 and all(r.decoded is None and r.tokens.shape == (4, 4) for r in rows)


def test_beitv2_import_matches_the_reference_on_a_codebook_that_is_not_unit_length(tmp_path):
    sd = _vqkd_file(tmp_path)
    tid = import_released("beitv2-vqkd", tmp_path / "vqkd.pth", tmp_path / "tok", num_heads=HEADS)
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.tokenizer_id == tid and (tok.kind, tok.config.arch, tok.grid, tok.input_size) == ("vqkd", "beitv2", (4, 4), 32)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = beitv2_reference_ids(sd, x, HEADS)
    ids = tok.encode(x).view(8, -1)
    assert torch.equal(ids, ref)
    # the stored rows are used as they are: cosine look-up (renormalised rows) would give other ids here
    z = tok.encode_features(x).reshape(-1, 8)
    cosine = (z @ torch.nn.functional.normalize(tok.codebook(), dim=-1).t()).argmax(dim=1).view(8, -1)
    assert (cosine != ref).any() and len(ref.unique()) > 16
    assert torch.equal(tok.codebook(), sd["quantize.embedding.weight"])
    # only the encoder side is kept: no decoder, teacher head or EMA statistics
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "tok" / "model.safetensors")).keys()
    assert not any(k.startswith(("decoder.", "decode_task_layer.")) or "cluster_size" in k for k in keys)


def test_same_checkpoint_same_id_and_other_weights_other_id(tmp_path):
    _vqkd_file(tmp_path)
    a = import_released("beitv2-vqkd", tmp_path / "vqkd.pth", tmp_path / "a", num_heads=HEADS)
    b = import_released("beitv2-vqkd", tmp_path / "vqkd.pth", tmp_path / "b", num_heads=HEADS)
    _vqkd_file(tmp_path, seed=1)
    c = import_released("beitv2-vqkd", tmp_path / "vqkd.pth", tmp_path / "c", num_heads=HEADS)
    assert a == b != c
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()


# --- wrong kind, wrong shape ----------------------------------------------------------------------
def test_wrong_kind_or_shape_is_one_line_naming_what_does_not_match(tmp_path, capsys):
    from mimflow.cli import main

    _dalle_files(tmp_path)
    sd = _vqkd_file(tmp_path)
    cases = [
        (["dalle-dvae", str(tmp_path / "vqkd.pth")], "is not a DALL-E encoder: it holds a dict with keys ['model']"),
        (["beitv2-vqkd", str(tmp_path / "encoder.pkl")], "is not a BEiT v2 VQ-KD checkpoint: it holds a pickled dall_e.encoder.Encoder"),
        (["dalle-dvae", str(tmp_path / "decoder.pkl")], "expected a pickled dall_e.encoder.Encoder"),
        (["dalle-dvae", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "encoder.pkl")],
         "is not a DALL-E decoder"),
    ]
    bad = dict(sd)
    bad["encoder.blocks.1.attn.proj.weight"] = torch.zeros(32, 16)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    cases.append((["beitv2-vqkd", str(tmp_path / "bad.pth"), "--num-heads", "2"],
                  "tensor 'encoder.blocks.1.attn.proj.weight' has shape [32, 16], but width 32"))
    missing = {k: v for k, v in sd.items() if k != "encode_task_layer.2.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    cases.append((["beitv2-vqkd", str(tmp_path / "missing.pth"), "--num-heads", "2"], "missing tensor 'encode_task_layer.2.bias'"))
    whole = (tmp_path / "encoder.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(whole[: len(whole) - 100])  # legacy file cut inside the last storage
    cases.append((["dalle-dvae", str(tmp_path / "cut.pkl")], "file truncated"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    cases.append((["beitv2-vqkd", str(tmp_path / "junk.pth")], "not a readable torch.save checkpoint"))
    for argv, expected in cases:
        assert main(["tokenizer", "import", *argv, "--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out").exists()


def test_print_config_shows_what_was_recognised_and_writes_nothing(tmp_path, capsys):
    from mimflow.cli import main

    _dalle_files(tmp_path)
    assert main(["tokenizer", "import", "dalle-dvae", str(tmp_path / "encoder.pkl"), "--decoder",
                 str(tmp_path / "decoder.pkl"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "DALL-E dVAE encoder (n_hid 8, 1 blocks/group" in out and "vocabulary: 64, grid: 14x14, input size: 112px" in out
    assert "map_pixels" in out and '"arch": "dall-e"' in out
    _vqkd_file(tmp_path)
    assert main(["tokenizer", "import", "beitv2-vqkd", str(tmp_path / "vqkd.pth"), "--num-heads", "2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "VQ-KD ViT encoder (width 32, depth 2, heads 2" in out and "vocabulary: 128, grid: 4x4, input size: 32px" in out
    assert "x * 255 / 127.5 - 1" in out and "training-only tensors left out" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.pkl", "encoder.pkl", "vqkd.pth"]


def test_the_released_shapes_are_recognised(tmp_path):
    """Full-size layouts on the meta device (no memory): the hyper-parameters of the published files."""
    sd = beitv2_state_dict(device="meta", dec_depth=3)  # vqkd_encoder_base_decoder_3x768x12_clip
    cfg = recognise_beitv2(sd, "vqkd.pth")
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.code_dim) == (768, 12, 12, 4.0, 32)
    assert (cfg.vocab_size, cfg.grid, cfg.input_size, cfg.patch_size) == (8192, 14, 224, 16)
    kept = {k: v for k, v in sd.items() if k.startswith(("encoder.", "encode_task_layer.")) or k == "quantize.embedding.weight"}
    check_tensors(cfg, kept, "vqkd.pth")
    with torch.device("meta"):
        enc, dec = Encoder(), Decoder()  # the released defaults: n_hid 256, 2 blocks/group, vocab 8192, n_init 128
    cfg = recognise_dalle(enc.state_dict(), 2, 112, "encoder.pkl", dec.state_dict(), 2, "decoder.pkl")
    assert (cfg.width, cfg.depth, cfg.vocab_size, cfg.grid, cfg.input_size) == (256, 2, 8192, 14, 112)
    assert (cfg.code_dim, cfg.decoder_width, cfg.decoder_depth) == (128, 256, 2)
    tensors = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    tensors.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    check_tensors(cfg, tensors, "encoder.pkl")


def test_trained_tokenizer_configs_and_ids_are_unchanged_by_the_arch_field(tmp_path):
    import json

    from tokenizer.base import TokenizerConfig
    from tokenizer.checkpoint import build_tokenizer, save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(TokenizerConfig(kind="dvae", vocab_size=16, grid=2, input_size=8, width=4, depth=1,
                                                   code_dim=4)), tmp_path / "t")
    assert "arch" not in json.loads((tmp_path / "t" / "config.json").read_text())
    with pytest.raises(ValueError, match="arch 'dall-e' does not implement kind 'vqkd'"):
        TokenizerConfig(kind="vqkd", arch="dall-e")


def test_recognise_names_the_file_that_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        recognise("dalle-dvae", tmp_path / "nope.pkl")
    with pytest.raises(TokenizerLoadError, match="unknown tokenizer kind 'vqgan'"):
        recognise("vqgan", tmp_path / "nope.pkl")
