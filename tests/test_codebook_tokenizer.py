"""The report with a real (tiny, random-weight) tokenizer: FAISS geometry, and the agreement of
FAISS re-assignment with the cached tokens: 100% on a fresh cache, lower when tokens are altered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from eval.codebook import faiss_ops
from eval.codebook.report import codebook_report
from cache_fixture import commit_shards
from pipeline.errors import StageError
from pipeline.images import decode_rgb, encode_png
from pipeline.tensors import to_tensor
from pipeline.token_cache import encode_sample, shard_name, write_shard
from pipeline.views import make_views, render_view
from tokenizer.base import TokenizerConfig
from tokenizer.checkpoint import build_tokenizer, save_tokenizer

torch.manual_seed(0)
K = 16


@pytest.fixture(scope="module")
def vqkd_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "vqkd"
    cfg = TokenizerConfig(kind="vqkd", vocab_size=K, grid=2, input_size=16, width=16, depth=1, num_heads=2, code_dim=8)
    save_tokenizer(build_tokenizer(cfg), path)
    return path


@pytest.fixture(scope="module")
def dvae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "dvae"
    cfg = TokenizerConfig(kind="dvae", vocab_size=K, grid=2, input_size=16, width=8, depth=1, code_dim=8)
    save_tokenizer(build_tokenizer(cfg), path)
    return path


def build_cache(root: Path, tokenizer_dir: Path, shards: int = 3, per_shard: int = 4, views: int = 2, vocab: int | None = None) -> Path:
    """A cache built as the contract says: tokens = tok.encode(render_view(image, view, input_size))."""
    from tokenizer.checkpoint import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cache = root / tok.tokenizer_id
    cache.mkdir(parents=True)
    rng = np.random.default_rng(1)
    shard_members, n = [], 0
    for s in range(shards):
        members = []
        for _ in range(per_shard):
            h, w = int(rng.integers(14, 30)), int(rng.integers(14, 30))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            data, key = encode_png(pixels), f"k{n:04d}"
            vs = make_views(key, w, h, views, seed=0)
            img = decode_rgb(data)
            batch = torch.stack([to_tensor(render_view(img, v, tok.input_size)) for v in vs])
            tokens = tok.encode(batch).numpy().astype(np.uint16)
            members.append(encode_sample(key, data, "png", tokens, w, h, vs, n % 3))
            n += 1
        shard_members.append(members)
    commit_shards(str(cache), shard_members, tokenizer_id=tok.tokenizer_id, kind=tok.kind,
                  vocab_size=vocab or tok.vocab_size, grid=tok.grid, input_size=tok.input_size, views=views,
                  classes=["a", "b", "c"])
    return cache


def alter_shard(cache: Path, index: int) -> int:
    """Shift every token of one shard by one code (a corrupted/stale shard); returns tokens altered."""
    from pipeline.token_cache import decode_sample, read_shard

    path = str(cache / shard_name(index))
    members, altered = [], 0
    for sample in read_shard(path):
        cs = decode_sample(sample)
        tokens = ((cs.tokens.astype(np.int64) + 1) % K).astype(np.uint16)
        altered += tokens.size
        members.append(encode_sample(cs.key, cs.image, cs.fmt, tokens, cs.width, cs.height, cs.views, cs.label))
    write_shard(path, members)
    return altered


@pytest.mark.slow
def test_vqkd_agreement_and_geometry(tmp_path, vqkd_dir, ray_local):
    cache = build_cache(tmp_path / "tokens", vqkd_dir)
    rep = codebook_report(str(cache), str(tmp_path / "fresh"), tokenizer_dir=str(vqkd_dir), sample=64, quiet=True)
    a = rep["agreement"]
    assert a["agreement"] == 1.0 and a["views_fully_equal"] == 1.0
    assert a["method"] == "faiss-cosine" and (a["images"], a["views"], a["tokens"]) == (12, 24, 96)
    assert a["mean_cosine_to_code"] <= 1.0 and rep["tokenizer"]["matches_cache"]

    # geometry: FAISS's nearest codes equal numpy's brute force on the tokenizer's own codebook
    from tokenizer.checkpoint import load_tokenizer

    cb = load_tokenizer(vqkd_dir).codebook().numpy().astype(np.float64)
    sims = cb @ cb.T
    np.fill_diagonal(sims, -np.inf)
    codes = pq.read_table(tmp_path / "fresh" / "codes.parquet").to_pylist()
    assert [c["nearest_code"] for c in codes] == sims.argmax(1).tolist()
    assert np.allclose([c["nearest_cosine"] for c in codes], sims.max(1), atol=1e-5)
    g = rep["geometry"]
    assert g["normalised"] and g["kmeans"]["clusters"] == faiss_ops.default_clusters(K) and not g["faiss_gpu"]
    expected_pairs = int((np.triu(sims, 1) > 0.95).sum())
    assert g["duplicate_pairs"] == expected_pairs
    assert all(c["cluster"] is not None for c in codes)
    html = (tmp_path / "fresh" / "report.html").read_text()
    assert "Agreement with the cached tokens" in html and "100.00%" in html

    # a corrupted shard: exactly its share of the sampled tokens disagrees
    altered = alter_shard(cache, 1)
    rep2 = codebook_report(str(cache), str(tmp_path / "altered"), tokenizer_dir=str(vqkd_dir), sample=64, quiet=True)
    a2 = rep2["agreement"]
    assert altered == 32 and a2["agreement"] == pytest.approx(1 - 32 / 96)
    assert [p["agreement"] for p in a2["per_shard"]] == [1.0, 0.0, 1.0] and a2["worst_shard_agreement"] == 0.0
    assert "stale or corrupt" in "\n".join(rep2["summary"])


def test_dvae_agreement_uses_encode(tmp_path, dvae_dir, ray_local):
    cache = build_cache(tmp_path / "tokens", dvae_dir, shards=2, per_shard=3, views=1)
    rep = codebook_report(str(cache), str(tmp_path / "r"), tokenizer_dir=str(dvae_dir), sample=4, quiet=True)
    a = rep["agreement"]
    assert a["method"] == "tokenizer.encode" and a["agreement"] == 1.0 and a["images"] == 4
    assert rep["geometry"] is not None and not rep["geometry"]["normalised"]  # the dVAE's code embedding
    alter_shard(cache, 0)
    rep = codebook_report(str(cache), str(tmp_path / "r2"), tokenizer_dir=str(dvae_dir), sample=6, quiet=True)
    assert rep["agreement"]["agreement"] == pytest.approx(0.5)


def test_tokenizer_with_another_vocabulary_is_refused(tmp_path, vqkd_dir, ray_local):
    cache = build_cache(tmp_path / "tokens", vqkd_dir, shards=1, per_shard=1, views=1, vocab=32)
    with pytest.raises(StageError, match="vocabulary of 16 codes but the cache was made with 32"):
        codebook_report(str(cache), str(tmp_path / "r"), tokenizer_dir=str(vqkd_dir), quiet=True)
    with pytest.raises(StageError, match="cannot load tokenizer"):
        codebook_report(str(cache), str(tmp_path / "r"), tokenizer_dir=str(tmp_path / "no-such-tokenizer"), quiet=True)
