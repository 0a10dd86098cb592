"""The cache's sample layout (format 3): image + one ``.mim`` member; format-2 caches refused, then refreshed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.token_cache import (
    INFO_KEY,
    MANIFEST,
    CacheError,
    check_cache,
    decode_sample,
    encode_sample,
    read_cache_info,
    read_manifest,
    read_shard,
    shard_urls,
    write_shard,
)
from pipeline.views import View, views_to_json
from cache_fixture import format_2_members
from test_cache_support import make_tokenizer, read_cache
from tokenizer.cache_records import BUILD_DIR
from tokenizer.cache_verify import verify_cache

VIEWS = [View((0, 0, 20, 16), False), View((3, 2, 19, 14), True)]


def _sample(key: str = "a001", label: int | None = 4) -> dict[str, bytes]:
    tokens = np.arange(2 * 3 * 5, dtype=np.uint16).reshape(2, 3, 5) * 2000  # ids up to 58000: all 16 bits
    return encode_sample(key, b"\x89PNG not decoded here", "png", tokens, 20, 16, VIEWS, label)


@pytest.mark.parametrize("label", [4, 0, None])
def test_one_member_round_trips_tokens_views_and_label(label):
    members = _sample(label=label)
    assert sorted(members) == ["__key__", "mim", "png"]  # the image and one metadata member
    s = decode_sample(members)
    assert (s.key, s.fmt, s.image, s.width, s.height, s.views, s.label) == (
        "a001", "png", b"\x89PNG not decoded here", 20, 16, VIEWS, label)
    assert s.tokens.dtype == np.uint16 and s.tokens.shape == (2, 3, 5) and int(s.tokens[1, 2, 4]) == 29 * 2000
    s.tokens[0, 0, 0] = 1  # a writable array, as np.load gave
    # the views are views_to_json's bytes, stored as they are: 22-byte header + JSON + 2 bytes per token
    assert len(members["mim"]) == 22 + len(views_to_json(20, 16, VIEWS)) + 2 * 30


def test_a_shard_of_the_new_layout_has_two_members_per_sample(tmp_path):
    path = str(tmp_path / "shard-000000.tar")
    write_shard(path, [_sample("a001"), _sample("a002", None)])
    import tarfile

    with tarfile.open(path) as tf:
        assert tf.getnames() == ["a001.mim", "a001.png", "a002.mim", "a002.png"]
    got = [decode_sample(r) for r in read_shard(path)]
    assert [(s.key, s.label) for s in got] == [("a001", 4), ("a002", None)]


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[:-1], "header says"),  # truncated
        (lambda b: b"XXXX" + b[4:], "not b'MIM1'"),  # wrong magic
        (lambda b: b[:10], "shorter than"),
        (lambda b: b[:22] + b"{not json" + b[31:], "damaged .mim"),  # the views JSON
    ],
)
def test_a_damaged_member_is_one_line_naming_shard_and_key(tmp_path, damage, why):
    path = str(tmp_path / "shard-000007.tar")
    bad = _sample("b042")
    bad["mim"] = damage(bad["mim"])
    write_shard(path, [_sample("b041"), bad])
    good, raw = read_shard(path)
    assert decode_sample(good).key == "b041"
    with pytest.raises(CacheError) as e:
        decode_sample(raw)
    msg = str(e.value)
    assert "\n" not in msg and "shard-000007.tar" in msg and "'b042'" in msg and why in msg, msg
    assert f"mimflow tokens verify {tmp_path}" in msg, msg


def test_a_missing_member_or_a_second_image_is_refused():
    no_mim = {k: v for k, v in _sample().items() if k != "mim"}
    with pytest.raises(CacheError, match=r"sample 'a001': no \.mim member"):
        decode_sample(no_mim)
    with pytest.raises(CacheError, match=r"one image member beside \.mim, found \['png', 'jpg'\]"):
        decode_sample({**_sample(), "jpg": b"x"})
    with pytest.raises(ValueError, match="negative"):
        _sample(label=-2)


# ------------------------------------------------------------------------------------ format 2


def _to_format_2(cache_dir: str) -> list[tuple]:
    """Rewrite a committed cache as mimflow wrote it before format 3 (four members per sample, the
    CacheInfo without the byte counts, records without a format); returns its samples' contents."""
    rows = read_manifest(cache_dir)
    info = json.loads(read_cache_info(cache_dir).to_json())
    contents = []
    for row, url in zip(rows, shard_urls(cache_dir, rows)):
        old = []
        for raw in read_shard(url):
            s = decode_sample(raw)
            old.append(format_2_members(s))
            contents.append((s.key, s.fmt, s.image, s.tokens.tobytes(), s.width, s.height, s.views, s.label))
        Path(url).unlink()
        row["samples"], row["bytes"], row["sha256"] = write_shard(url, old)
    for name in ("shard_bytes", "image_bytes", "bytes_per_sample"):
        del info[name]
    info["format"] = 2
    schema = pq.read_schema(str(Path(cache_dir) / MANIFEST))
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata({INFO_KEY: json.dumps(info).encode()}))
    pq.write_table(table, str(Path(cache_dir) / MANIFEST))
    for rec in (Path(cache_dir) / BUILD_DIR).glob("part-*.json"):  # records name the rewritten shards
        doc = json.loads(rec.read_text())
        doc.pop("format", None)
        row = next((r for r in rows if r["shard"] == doc["shard"]), None)
        if row is not None:
            doc["bytes"], doc["sha256"] = row["bytes"], row["sha256"]
        rec.write_text(json.dumps(doc))
    return sorted(contents, key=lambda c: c[0])


def _contents(cache_dir: str) -> list[tuple]:
    return sorted(((s.key, s.fmt, s.image, s.tokens.tobytes(), s.width, s.height, s.views, s.label)
                   for s in read_cache(cache_dir)), key=lambda c: c[0])


@pytest.mark.slow
def test_a_format_2_cache_is_refused_then_refresh_rebuilds_it_losing_nothing(ray_local, tmp_path, capsys):
    from mimflow.cli import main
    from tokenizer.cache_ops import refresh
    from tokenizer.precompute import build_cache

    tok = make_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    built = build_cache(tok, "shapes?n=20&size=24&seed=2&partition_size=8", str(out), 2, num_actors=1)
    cache = built.cache_dir
    info = read_cache_info(cache)
    assert info.format == 3 and info.samples == 20 and info.shard_bytes == sum(r["bytes"] for r in read_manifest(cache))
    assert 0 < info.image_bytes < info.shard_bytes and info.bytes_per_sample == round(info.shard_bytes / 20, 1)
    before = _to_format_2(cache)
    assert len(before) == 20 and any(c[7] is not None for c in before)

    for read in (check_cache, read_cache_info, read_cache):
        with pytest.raises(CacheError) as e:
            read(cache)
        msg = str(e.value)
        assert "\n" not in msg and cache in msg and "format 2" in msg and "tokens.npy" in msg, msg
        assert f"mimflow tokens refresh --tokenizer <tokenizer dir> --out {out}" in msg, msg
    assert not verify_cache(cache).ok
    raw = read_shard(shard_urls(cache, read_manifest(cache))[0])[0]
    with pytest.raises(CacheError, match="cache format 2 .*mimflow tokens refresh"):  # a shard read directly
        decode_sample(raw)

    capsys.readouterr()
    report = refresh(tok, str(out), num_actors=1)  # source, views, seed and partitions from the old cache
    assert "cache format 2 -> 3" in report.reason and report.build.encoded == 3 and report.build.reused == 0
    new = read_cache_info(cache)
    assert (new.format, new.source, new.views, new.seed, new.partitions, new.samples, new.errors) == (
        3, info.source, 2, info.seed, info.partitions, 20, 0)
    assert _contents(cache) == before  # every key, image, token, view and label kept
    assert verify_cache(cache).ok
    assert new.shard_bytes == sum(r["bytes"] for r in read_manifest(cache))

    assert main(["tokens", "show", cache, "--n", "1", "--out", str(tmp_path / "s.png")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "bytes/sample" in x)
    assert line.startswith(f"{cache}: 20 samples in 3 shard(s)") and f"{new.bytes_per_sample:.0f} bytes/sample" in line, line
