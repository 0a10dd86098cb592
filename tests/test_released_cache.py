"""From a fresh clone: a released-layout checkpoint -> `tokenizer import` -> `tokens build` -> pretraining.

The ids in the shards equal the reference forward on the same pixels, and pretraining's `tokens-online`
arm reproduces the cached tokens view for view."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from released_layouts import (  # noqa: E402
    Decoder,
    Encoder,
    beitv2_reference_ids,
    beitv2_state_dict,
    dalle_reference_logits,
    save_dalle,
)

SIZE = 32  # both tokenizers take 32 px here (grid 4): the PNGs are already at that size


def _pngs(root: Path, n: int = 10) -> tuple[str, dict[str, np.ndarray]]:
    """Square PNGs at the tokenizer's input size: smooth blobs, so the tokens vary."""
    from pipeline.images import encode_png

    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    pixels = {}
    for i in range(n):
        c = rng.random((3, 3))
        img = np.stack([c[0, k] + c[1, k] * np.sin(6 * xx + i) + c[2, k] * np.cos(5 * yy * (k + 1)) for k in range(3)], -1)
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
        (root / f"img{i:02d}.png").write_bytes(encode_png(img))
        pixels[f"img{i:02d}"] = img
    return f"{root}?partition_size=4", pixels


def _import_and_build(tmp_path: Path, argv: list[str], spec: str) -> tuple[str, str]:
    from mimflow.cli import main

    tok_dir = str(tmp_path / "tok")
    assert main(["tokenizer", "import", *argv, "--out", tok_dir]) == 0
    out = tmp_path / "tokens"
    assert main(["tokens", "build", "--tokenizer", tok_dir, "--source", spec, "--out", str(out), "--views", "1",
                 "--actors", "1"]) == 0
    from tokenizer.checkpoint import tokenizer_id

    return tok_dir, str(out / tokenizer_id(tok_dir))


def _cached(cache_dir: str) -> dict[str, np.ndarray]:
    from pipeline.token_cache import check_cache, decode_sample, read_shard, shard_urls

    _, rows = check_cache(cache_dir)
    samples = (decode_sample(r) for url in shard_urls(cache_dir, rows) for r in read_shard(url))
    return {s.key.rsplit("-", 1)[0]: s.tokens for s in samples}  # key: the file name + a hash of its path


def _batch(pixels: dict[str, np.ndarray], keys: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([pixels[k] for k in keys])).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_dalle_fresh_clone_import_then_cache_ids_equal_the_reference(ray_local, tmp_path):
    torch.manual_seed(0)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=64)
    save_dalle(tmp_path / "encoder.pkl", enc)
    save_dalle(tmp_path / "decoder.pkl", Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=64))
    spec, pixels = _pngs(tmp_path / "imgs")
    tok_dir, cache = _import_and_build(tmp_path, ["dalle-dvae", str(tmp_path / "encoder.pkl"), "--decoder",
                                                  str(tmp_path / "decoder.pkl"), "--input-size", str(SIZE)], spec)
    cached = _cached(cache)
    keys = sorted(cached)
    assert keys == sorted(pixels) and all(cached[k].shape == (1, 4, 4) for k in keys)
    ref = dalle_reference_logits(enc.state_dict(), _batch(pixels, keys), 1).argmax(dim=1).numpy()
    got = np.stack([cached[k][0] for k in keys])
    assert len(np.unique(ref)) > 3
    assert np.array_equal(got, ref)  # 100% of ids
    # `tokens show` draws what the tokens mean with the imported decoder
    from tokenizer.cache_show import show_rows

    rows = show_rows(cache, n=2, tokenizer_dir=tok_dir)
    assert len(rows) == 2 and all(r.decoded is not None and r.decoded.size == (SIZE, SIZE) for r in rows)


@pytest.fixture(scope="module")
def vqkd_cache(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("released_vqkd")
    sd = beitv2_state_dict(dim=32, depth=2, grid=4, patch=8, vocab=128, code_dim=8, teacher_dim=16)
    torch.save({"model": sd}, root / "vqkd_encoder_base_decoder_1x768x12_clip.pth")
    spec, pixels = _pngs(root / "imgs", n=16)
    tok_dir, cache = _import_and_build(
        root, ["beitv2-vqkd", str(root / "vqkd_encoder_base_decoder_1x768x12_clip.pth"), "--num-heads", "2"], spec)
    return root, sd, pixels, tok_dir, cache


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_beitv2_fresh_clone_import_then_cache_ids_equal_the_reference(vqkd_cache):
    _, sd, pixels, _, cache = vqkd_cache
    cached = _cached(cache)
    keys = sorted(cached)
    assert keys == sorted(pixels)
    ref = beitv2_reference_ids(sd, _batch(pixels, keys), 2).view(-1, 4, 4).numpy()
    got = np.stack([cached[k][0] for k in keys])
    assert len(np.unique(ref)) > 3
    assert np.array_equal(got, ref)
    # the FAISS codebook report re-assigns the features against the stored (not unit-length) rows: all agree
    from eval.codebook.report import codebook_report

    rep = codebook_report(cache, str(vqkd_cache[0] / "report"), tokenizer_dir=vqkd_cache[3], sample=16,
                          mosaic_codes=0, quiet=True)
    assert rep["agreement"]["method"].startswith("faiss-l2") and rep["agreement"]["agreement"] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretraining_from_an_imported_cache_and_tokens_online_agree(vqkd_cache):
    from pipeline.config import load_config
    from pretrain.checkpoint import read_metrics
    from pretrain.data import SampleTransform, make_dataset, make_loader
    from pretrain.masking import make_masker
    from pretrain.train import PretrainConfig, plan_run, run_pretrain
    from tokenizer.checkpoint import load_tokenizer

    root, _, _, tok_dir, cache = vqkd_cache
    tok = load_tokenizer(tok_dir)

    def cfg(target: str, *extra: str):
        return load_config(PretrainConfig, None, [
            f"data.tokens={cache}", f"data.tokenizer={tok_dir}", f"target={target}", "data.img_size=32",
            "data.batch_size=8", "data.loader_workers=0", "data.shuffle_buffer=0", "model.dim=32", "model.depth=1",
            "model.heads=2", "model.patch=8", "model.drop_path=0.0", "mask.num_masked=6", "mask.min_block=2",
            "optim.warmup_steps=1", "steps=2", "workers=1", f"out={root / 'runs'}", f"run_name={target}",
            "log_every=1", *extra])

    # tokens-online renders the same view at the tokenizer's size and encodes it in the step: same ids,
    # checked on every cached sample through the loader's own transform
    from pipeline.token_cache import check_cache, read_shard, shard_urls

    transforms = {}
    for target in ("tokens", "tokens-online"):
        plan = plan_run(cfg(target))
        assert plan.tokenizer_id == tok.tokenizer_id and plan.vocab_size == 128
        transforms[target] = SampleTransform(img_size=32, masker=make_masker("block", (4, 4), plan.num_masked, min_block=2),
                                             target=target, tok_input_size=plan.tok_input_size)
    _, rows = check_cache(cache)
    raws = [r for url in shard_urls(cache, rows) for r in read_shard(url)]
    cached = torch.stack([transforms["tokens"](r)["tokens"] for r in raws])
    online = tok.encode(torch.stack([transforms["tokens-online"](r)["tok_image"] for r in raws]))
    assert len(raws) == 16 and len(cached.unique()) > 3
    assert torch.equal(online, cached)  # 100% agreement
    batch = next(iter(make_loader(make_dataset(plan.urls, transforms["tokens-online"], 8, shuffle_buffer=0), 1)))
    assert batch["tok_image"].shape == (8, 3, 32, 32) and batch["tok_image"].dtype == torch.uint8

    # one real run (Ray Train, 1 worker) from the imported cache with the tokenizer in the step
    result = run_pretrain(cfg("tokens-online"))
    assert result.metrics["step"] == 2
    steps = [r for r in read_metrics(str(root / "runs" / "tokens-online")) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_jittered_views_builder_and_loader_render_the_same_pixels_and_tokens_online_agrees(ray_local, tmp_path):
    """BEiT v1's views (jitter 0.4, crop 0.08-1, lanczos tokenizer side) with an imported DALL-E: the ids in
    the cache are the reference forward on render_view's pixels, the pretraining loader rebuilds exactly
    those pixels, and tokens-online gives the cached ids back (100%)."""
    from mimflow.cli import main
    from pipeline.images import decode_rgb, encode_png
    from pipeline.tensors import pixels
    from pipeline.token_cache import check_cache, decode_sample, read_cache_info, read_shard, shard_urls
    from pipeline.views import View, render_view
    from pretrain.data import SampleTransform
    from pretrain.masking import make_masker
    from tokenizer.checkpoint import load_tokenizer, tokenizer_id

    torch.manual_seed(0)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=64)
    save_dalle(tmp_path / "encoder.pkl", enc)
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:40, 0:52] / 40
    for i in range(6):  # not square, not at either size: every view is cropped and resampled
        c = rng.random((3, 3))
        img = np.stack([c[0, k] + c[1, k] * np.sin(5 * xx + i) + c[2, k] * np.cos(4 * yy * (k + 1)) for k in range(3)], -1)
        (tmp_path / "imgs" / f"img{i}.png").write_bytes(encode_png((255 * (img - img.min()) / np.ptp(img)).astype(np.uint8)))
    tok_dir = str(tmp_path / "tok")
    assert main(["tokenizer", "import", "dalle-dvae", str(tmp_path / "encoder.pkl"), "--input-size", str(SIZE),
                 "--out", tok_dir]) == 0
    assert main(["tokens", "build", "--tokenizer", tok_dir, "--source", f"{tmp_path / 'imgs'}?partition_size=3",
                 "--out", str(tmp_path / "tokens"), "--views", "3", "--actors", "1", "--jitter", "0.4",
                 "--crop-scale", "0.08", "1", "--tok-interp", "lanczos"]) == 0
    cache = str(tmp_path / "tokens" / tokenizer_id(tok_dir))
    assert read_cache_info(cache).view_style == "scale=0.08:1,jitter=0.4,interp=bicubic,tok_interp=lanczos"
    tok = load_tokenizer(tok_dir)
    _, rows = check_cache(cache)
    raws = [r for url in shard_urls(cache, rows) for r in read_shard(url)]
    assert len(raws) == 6

    # the builder: every cached view's ids are the reference forward on render_view's tokenizer-side pixels
    rendered, ids = [], []
    for raw in raws:
        s = decode_sample(raw)
        img = decode_rgb(s.image)
        for v, view in enumerate(s.views):
            assert len(view.jitter) == 3 and view.tok_interp == "lanczos"
            px = render_view(img, view, SIZE, "tokenizer")
            plain = render_view(img, View(view.box, view.flip, (), view.interp, view.tok_interp), SIZE, "tokenizer")
            assert not np.array_equal(np.asarray(px), np.asarray(plain))  # the jitter is in the tokens' pixels
            rendered.append(np.asarray(px))
            ids.append(s.tokens[v])
    x = torch.from_numpy(np.stack(rendered)).permute(0, 3, 1, 2).float() / 255.0
    ref = dalle_reference_logits(enc.state_dict(), x, 1).argmax(dim=1).numpy()
    assert len(np.unique(ref)) > 3
    assert np.array_equal(np.stack(ids), ref)

    # the loader: its images are render_view of one recorded view (image side, 48 px bicubic; tokenizer side
    # at 32 px lanczos), and tokens-online encodes them into exactly that view's cached ids
    masker = make_masker("block", (4, 4), 4, min_block=2)
    online = SampleTransform(img_size=48, masker=masker, target="tokens-online", tok_input_size=SIZE)
    tok_images, cached = [], []
    for _ in range(3):  # each pass picks views at random
        for raw in raws:
            out = online(raw)
            s = decode_sample(raw)
            img = decode_rgb(s.image)
            match = [v for v, view in enumerate(s.views) if torch.equal(out["image"], pixels(render_view(img, view, 48)))]
            assert len(match) == 1
            assert torch.equal(out["tok_image"], pixels(render_view(img, s.views[match[0]], SIZE, "tokenizer")))
            tok_images.append(out["tok_image"])
            cached.append(torch.from_numpy(s.tokens[match[0]].astype(np.int64)))
    got = tok.encode(torch.stack(tok_images).float() / 255.0)
    assert torch.equal(got, torch.stack(cached))  # 100% agreement
