"""The pretraining loader on token caches: a cache from the real builder feeds it (issue #16), and
it does not trust shard contents (issue #15.9): bad token ids, damaged tars, missing members and,
with ``data.verify_shards``, changed bytes each give one ``CacheError`` line naming where and what
to run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache_fixture import commit_shards
from pipeline.images import encode_png
from pipeline.token_cache import CacheError, check_cache, encode_sample, read_shard, shard_urls
from pipeline.views import centre_view
from pretrain.data import SampleTransform, make_dataset, make_loader
from pretrain.masking import BlockMasking
from test_cache_support import make_tokenizer, read_cache


def _transform(vocab: int | None) -> SampleTransform:
    return SampleTransform(img_size=32, masker=BlockMasking((4, 4), 6, min_block=2), vocab_size=vocab)


def _batches(cache_dir: str, vocab: int | None, n: int = 2, sha256: dict | None = None) -> list[dict]:
    _, rows = check_cache(cache_dir)
    ds = make_dataset(shard_urls(cache_dir, rows), _transform(vocab), 4, shuffle_buffer=0, sha256=sha256)
    return list(make_loader(ds, n))


def test_a_cache_from_the_real_builder_feeds_the_pretraining_loader(ray_local, tmp_path):
    from tokenizer.precompute import build_cache

    tok = make_tokenizer(tmp_path / "tok")
    cache_dir = build_cache(tok, "shapes?n=24&size=32&seed=5&partition_size=8", str(tmp_path / "out"), 2,
                            num_actors=1).cache_dir
    info, _ = check_cache(cache_dir)
    cached = {s.tokens[v].astype(np.int64).tobytes() for s in read_cache(cache_dir) for v in range(2)}
    batches = _batches(cache_dir, info.vocab_size, n=3)
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (4, 3, 32, 32) and b["tokens"].shape == (4, 4, 4)
        for row in b["tokens"].numpy():
            assert row.tobytes() in cached  # each target is the cached tokens of one view


def _fixture(tmp_path: Path, tokens_value: int = 3, drop: str | None = None) -> str:
    rng = np.random.default_rng(0)
    members = []
    for i in range(8):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        tokens = np.full((1, 4, 4), 3, np.uint16)
        if i == 5:
            tokens[0, 2, 1] = tokens_value
        m = encode_sample(f"s{i:03d}", encode_png(img), "png", tokens, 32, 32, [centre_view(32, 32)], 0)
        if i == 5 and drop:
            del m[drop]
        members.append(m)
    cache = tmp_path / "tok64"
    commit_shards(str(cache), [members], tokenizer_id="tok64", kind="dvae", vocab_size=64, grid=[4, 4],
                  input_size=32, views=1)
    return str(cache)


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "mimflow tokens verify" in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_a_token_id_beyond_the_vocabulary_is_a_one_line_cache_error(tmp_path):
    cache = _fixture(tmp_path, tokens_value=4155)
    with pytest.raises(CacheError) as e:
        _batches(cache, vocab=64)
    _one_line(e, "shard-000000.tar", "s005", "4155", "64")


def test_a_sample_missing_a_member_is_a_one_line_cache_error(tmp_path):
    cache = _fixture(tmp_path, drop="mim")
    with pytest.raises(CacheError) as e:
        _batches(cache, vocab=64)
    _one_line(e, "shard-000000.tar", "s005")


def test_a_flipped_tar_header_is_a_one_line_cache_error(tmp_path):
    cache = _fixture(tmp_path)
    shard = Path(cache) / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x20  # the first member's name: its header checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError) as e:
        _batches(cache, vocab=64)
    _one_line(e, "shard-000000.tar")


def test_verify_shards_refuses_a_shard_whose_bytes_changed(tmp_path):
    cache = _fixture(tmp_path)
    _, rows = check_cache(cache)
    url = shard_urls(cache, rows)[0]
    sha = {url: rows[0]["sha256"]}
    assert len(_batches(cache, vocab=64, sha256=sha)) == 2  # intact: reads as usual
    samples = read_shard(url)
    shard = Path(url)
    data = bytearray(shard.read_bytes())
    offset = data.index(samples[0]["png"][100:120])  # a byte inside the first image
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError) as e:
        _batches(cache, vocab=64, sha256=sha)
    _one_line(e, "shard-000000.tar", "sha256")
