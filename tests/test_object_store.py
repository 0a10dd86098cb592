"""Stages read and write a real S3-compatible server (moto, on loopback) exactly as they do a local disk."""

from __future__ import annotations

import torch

from pipeline import storage
from pipeline.token_cache import check_cache, shard_urls
from pretrain.data import SampleTransform, make_dataset, make_loader
from pretrain.masking import BlockMasking
from cache_fixture import PatchColorTokenizer, write_cache


def _copy_tree(src: str, dst: str) -> None:
    for path in storage.list_files(src):
        storage.write_bytes_atomic(dst + path[len(src):], storage.read_bytes(path))


def _batches(cache_dir: str, tok, n: int) -> list[dict[str, torch.Tensor]]:
    _, rows = check_cache(cache_dir, tok.tokenizer_id)
    transform = SampleTransform(img_size=32, masker=BlockMasking((4, 4), 6, min_block=2), target="tokens",
                                tok_input_size=tok.input_size, augment="views", seed=3)
    ds = make_dataset(shard_urls(cache_dir, rows), transform, batch_size=4, shuffle_buffer=1, seed=3)
    return list(make_loader(ds, n))


def test_pretraining_loader_streams_a_cache_from_a_bucket(tmp_path, s3_server):
    tok = PatchColorTokenizer((4, 4), 32)
    local = str(tmp_path / tok.tokenizer_id)
    # one shard: resampled mode draws shards with a time-based seed, the order inside a shard is fixed
    write_cache(local, tok, "shapes?n=12&size=48&seed=5", [12], views=2)
    remote = s3_server("mimflow-cache") + "/tokens/" + tok.tokenizer_id
    _copy_tree(local, remote)
    assert [u.startswith("s3://") for u in shard_urls(remote, check_cache(remote)[1])] == [True]

    from_bucket, from_disk = _batches(remote, tok, 3), _batches(local, tok, 3)
    assert len(from_bucket) == 3
    for a, b in zip(from_bucket, from_disk):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
