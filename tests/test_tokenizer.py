"""Tokenizer models, the checkpoint contract (save / load / tokenizer_id) and the teachers."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline.config import ConfigError, from_dict, load_config
from tokenizer.base import Tokenizer, TokenizerConfig, TokenizerLoadError
from tokenizer.checkpoint import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_id


def vqkd_config(**kw) -> TokenizerConfig:
    base = dict(kind="vqkd", vocab_size=64, grid=4, input_size=32, width=32, depth=1, num_heads=2, code_dim=8)
    return TokenizerConfig(**{**base, **kw})


def dvae_config(**kw) -> TokenizerConfig:
    base = dict(kind="dvae", vocab_size=64, grid=8, input_size=32, width=8, depth=1, code_dim=8)
    return TokenizerConfig(**{**base, **kw})


def built(cfg: TokenizerConfig, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return build_tokenizer(cfg).eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "cfg",
    [
        vqkd_config(),
        vqkd_config(input_size=48, grid=6),
        vqkd_config(input_size=64, grid=8),
        dvae_config(),
        dvae_config(grid=4),
        dvae_config(input_size=64, grid=8),
    ],
    ids=lambda c: f"{c.kind}-{c.input_size}px-grid{c.grid}",
)
def test_shapes_and_grid(cfg):
    tok = built(cfg)
    x = images(3, cfg.input_size)
    tokens = tok.encode(x)
    assert tokens.shape == (3, cfg.grid, cfg.grid) and tokens.dtype == torch.int64
    assert tok.grid == (cfg.grid, cfg.grid) and tok.input_size == cfg.input_size and tok.vocab_size == 64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < cfg.vocab_size
    cb = tok.codebook()
    assert cb.shape == (cfg.vocab_size, cfg.code_dim)
    if cfg.kind == "vqkd":
        feats = tok.encode_features(x)
        assert feats.shape == (3, cfg.grid * cfg.grid, cfg.code_dim)
        assert torch.allclose(feats.norm(dim=-1), torch.ones(3, cfg.grid * cfg.grid), atol=1e-5)
        assert torch.allclose(cb.norm(dim=-1), torch.ones(cfg.vocab_size), atol=1e-5)
        # the tokens are the nearest codes (cosine) of the features
        assert torch.equal(tokens.flatten(1), (feats @ cb.t()).argmax(-1))
        with pytest.raises(NotImplementedError):
            tok.decode(tokens)
    else:
        out = tok.decode(tokens)
        assert out.shape == (3, 3, cfg.input_size, cfg.input_size)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        with pytest.raises(NotImplementedError):
            tok.encode_features(x)


def test_wrong_image_size_names_the_size():
    tok = built(vqkd_config())
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\].*got \[2, 3, 64, 64\]"):
        tok.encode(images(2, 64))
    with pytest.raises(ValueError, match="input_size 32"):
        tok.encode(torch.rand(2, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 8, 8\]"):
        built(dvae_config()).decode(torch.zeros(1, 4, 4, dtype=torch.long))


def test_uint8_images_match_float_images():
    tok = built(vqkd_config())
    x8 = (images(2, 32) * 255).round().to(torch.uint8)
    assert torch.equal(tok.encode(x8), tok.encode(x8.float() / 255))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="power of two"):
        TokenizerConfig(kind="dvae", input_size=48, grid=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=70000)
    with pytest.raises(ValueError, match="multiple of grid"):
        TokenizerConfig(input_size=30, grid=4)
    with pytest.raises(ConfigError, match="model.kind"):
        from tokenizer.train_config import TokenizerTrainConfig

        from_dict(TokenizerTrainConfig, {"model": {"kind": "vqgan"}})


def test_tokenizer_id_deterministic_and_sensitive(tmp_path):
    a, b = built(vqkd_config(), seed=1), built(vqkd_config(), seed=1)
    assert re.fullmatch(r"[0-9a-f]{16}", a.tokenizer_id)
    assert a.tokenizer_id == b.tokenizer_id
    saved = save_tokenizer(a, tmp_path / "a")
    assert saved == a.tokenizer_id == tokenizer_id(tmp_path / "a") == load_tokenizer(tmp_path / "a").tokenizer_id
    # saving again (a fresh safetensors file) gives the same id
    assert save_tokenizer(b, tmp_path / "b") == saved
    with torch.no_grad():
        b.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert b.tokenizer_id != saved
    with torch.no_grad():
        b.blocks[0].attn.qkv.weight[0, 0] -= 1e-3
        b.quantizer.embedding[3] = b.quantizer.embedding[4]
    assert b.tokenizer_id != saved
    assert built(vqkd_config(mean=(0.5, 0.5, 0.5)), seed=1).tokenizer_id != saved  # config is part of the id
    assert built(vqkd_config(), seed=2).tokenizer_id != saved
    # the id is recorded in config.json for people; loading recomputes it from the content
    assert json.loads((tmp_path / "a" / "config.json").read_text())["tokenizer_id"] == saved


@pytest.mark.parametrize("cfg", [vqkd_config(), dvae_config()], ids=["vqkd", "dvae"])
def test_save_load_encode_identical(tmp_path, cfg):
    tok = built(cfg)
    x = images(4, cfg.input_size, seed=3)
    tid = save_tokenizer(tok, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Tokenizer.load(tmp_path / "tok")
    assert type(loaded) is type(tok) and loaded.config == tok.config
    assert loaded.tokenizer_id == tid
    assert torch.equal(loaded.encode(x), tok.encode(x))
    if cfg.kind == "dvae":
        t = tok.encode(x)
        assert torch.equal(loaded.decode(t), tok.decode(t))


def test_vqkd_export_leaves_out_training_state(tmp_path):
    tok = built(vqkd_config())
    tok.quantizer.cluster_size += 5
    keys = set(tok.export_state_dict())
    assert "quantizer.embedding" in keys and not any("cluster_size" in k or "usage" in k for k in keys)


@pytest.fixture()
def saved_vqkd(tmp_path):
    path = tmp_path / "tok"
    save_tokenizer(built(vqkd_config()), path)
    return path


def _edit_config(path, **changes):
    doc = json.loads((path / "config.json").read_text())
    doc.update(changes)
    for k, v in list(changes.items()):
        if v is None:
            del doc[k]
    (path / "config.json").write_text(json.dumps(doc))


def test_missing_files_are_named(tmp_path, saved_vqkd):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")
    (saved_vqkd / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_tokenizer(saved_vqkd)
    (saved_vqkd / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        tokenizer_id(saved_vqkd)


def test_corrupt_files_are_named(saved_vqkd):
    weights = saved_vqkd / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(TokenizerLoadError, match="model.safetensors.*corrupt"):
        load_tokenizer(saved_vqkd)
    weights.write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerLoadError, match="model.safetensors"):
        load_tokenizer(saved_vqkd)
    weights.write_bytes(good)
    (saved_vqkd / "config.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="config.json: not valid JSON"):
        load_tokenizer(saved_vqkd)


def test_config_mismatches_are_named(saved_vqkd):
    _edit_config(saved_vqkd, vocab_size=128)
    with pytest.raises(TokenizerLoadError, match="vocab_size=128.*vocab size mismatch"):
        load_tokenizer(saved_vqkd)
    _edit_config(saved_vqkd, vocab_size=64, grid=8)
    with pytest.raises(TokenizerLoadError, match="grid=8.*grid mismatch: weights are for grid 4"):
        load_tokenizer(saved_vqkd)
    _edit_config(saved_vqkd, grid=None)
    with pytest.raises(TokenizerLoadError, match="missing field 'grid'"):
        load_tokenizer(saved_vqkd)
    _edit_config(saved_vqkd, grid=4, kind="dvae")
    with pytest.raises(TokenizerLoadError, match="does not match the dvae config in config.json"):
        load_tokenizer(saved_vqkd)
    _edit_config(saved_vqkd, kind="vqkd", widht=3)
    with pytest.raises(TokenizerLoadError, match="unknown key 'widht'; did you mean 'width'"):
        load_tokenizer(saved_vqkd)


def test_hog_teacher_sees_orientation():
    from tokenizer.teachers import HOGTeacher

    hog = HOGTeacher(grid=4, input_size=32, bins=9, cell=4, gray=False)
    assert hog.dim == 3 * 9 * 4
    x = torch.zeros(2, 3, 32, 32)
    x[0, :, :, 16:] = 1.0  # a vertical edge
    x[1, :, 16:, :] = 1.0  # a horizontal edge
    f = hog(x)
    assert f.shape == (2, 16, hog.dim)
    cells = f.view(2, 16, 4, 3, 9)  # patch, cell, channel, bin
    vertical_bins = cells[0].sum(dim=(0, 1, 2))
    horizontal_bins = cells[1].sum(dim=(0, 1, 2))
    assert vertical_bins.argmax() != horizontal_bins.argmax()
    assert float(vertical_bins.max()) > 0.9 * float(vertical_bins.sum())  # one orientation dominates
    assert float(f[0, 0].norm()) == 0.0  # a flat patch has no gradient
    assert f[0].norm(dim=-1).max() <= 2.0 + 1e-5  # each of the 4 cells is l2-normalised


def test_hog_teacher_gray_ignores_colour_and_floor_keeps_flat_cells_quiet():
    from tokenizer.teachers import HOGTeacher

    hog = HOGTeacher(grid=4, input_size=32, bins=9, cell=4)  # defaults: luminance, floor 0.1
    assert hog.dim == 9 * 4
    red_on_black = torch.zeros(1, 3, 32, 32)
    red_on_black[0, 0, :, 16:] = 1.0
    green_on_black = torch.zeros(1, 3, 32, 32)
    green_on_black[0, 1, :, 16:] = 1.0
    a, b = hog(red_on_black), hog(green_on_black)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert float(cos) > 0.99  # the same edge in another colour: the same histograms
    noise = 0.5 + 0.01 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    flat = hog(noise).view(16, 4, 9).norm(dim=-1)  # per-cell norms
    edge = hog(red_on_black).view(16, 4, 9).norm(dim=-1)
    assert float(flat.max()) < 0.5  # pixel noise is not normalised up to a full histogram
    assert float(edge.max()) > 0.99  # a real edge still is
    no_floor = HOGTeacher(grid=4, input_size=32, bins=9, cell=4, floor=0.0)
    assert float(no_floor(noise).view(16, 4, 9).norm(dim=-1).min()) > 0.99


def test_timm_teacher_from_local_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    from tokenizer.teachers import build_teacher

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    teacher = build_teacher("timm:vit_tiny_patch16_224", grid=2, input_size=64,
                            weights=str(tmp_path / "teacher.safetensors"), kwargs=kwargs)
    out = teacher(images(2, 64))
    assert out.shape == (2, 4, 48) and teacher.dim == 48
    with pytest.raises(ConfigError, match="teacher_weights"):
        build_teacher("timm:vit_tiny_patch16_224", grid=2, input_size=64)
    with pytest.raises(ConfigError, match="'hog' or 'timm:<model_name>'"):
        build_teacher("clip", grid=2, input_size=64)


def test_packaged_recipes_load_and_demo_is_vqkd_demo():
    from pipeline.config import list_recipes, to_dict
    from tokenizer.train_config import TokenizerTrainConfig

    names = list_recipes(TokenizerTrainConfig.RECIPES)
    for name in ("demo", "vqkd_demo", "dvae_demo", "vqkd_base", "dvae_base"):
        assert name in names
    cfgs = {n: load_config(TokenizerTrainConfig, n) for n in names}
    assert to_dict(cfgs["demo"]) == to_dict(cfgs["vqkd_demo"])
    assert cfgs["vqkd_base"].model.vocab_size == 8192 and cfgs["vqkd_base"].model.code_dim == 32
    assert (cfgs["vqkd_base"].model.width, cfgs["vqkd_base"].model.depth, cfgs["vqkd_base"].model.patch_size) == (768, 12, 16)
    assert cfgs["dvae_base"].model.vocab_size == 8192 and cfgs["dvae_base"].model.grid == 14
    assert cfgs["dvae_base"].model.input_size == 112
    for cfg in cfgs.values():
        build_tokenizer(cfg.model) if cfg.model.width < 256 else None  # base sizes are built by the benchmark
