"""Token cache upkeep: refresh (tokenizer / source changes), gc, verify, show, the stage-1 config."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import encode_png
from pipeline.token_cache import check_cache, read_manifest, shard_name
from pipeline.sources import partition_of
from test_cache_support import make_tokenizer, read_cache
from tokenizer.cache_ops import refresh
from tokenizer.cache_verify import verify_cache
from tokenizer.precompute import build_cache


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("toks")
    return make_tokenizer(root / "t0", seed=0), make_tokenizer(root / "t1", seed=1)


@pytest.fixture(scope="module")
def built(ray_local, toks, tmp_path_factory) -> str:
    """One small committed cache (views=2), shared read-only; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("built")
    return build_cache(toks[0], "shapes?n=24&size=32&seed=5&partition_size=8", str(out), 2, num_actors=1).cache_dir


def _folder(root: Path, n: int = 12) -> str:
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        (root / f"im{i:02d}.png").write_bytes(encode_png(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))
    return f"{root}?partition_size=4"


def test_refresh_noop_new_tokenizer_and_gc(ray_local, toks, tmp_path, capsys):
    from mimflow.cli import main

    spec = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    first = refresh(toks[0], str(out), spec, num_actors=1)
    assert not first.up_to_date and first.build.encoded == 3
    manifest = (Path(first.cache_dir) / "manifest.parquet").read_bytes()

    again = refresh(toks[0], str(out))  # source and views come from the existing cache
    assert again.up_to_date and again.reason == "unchanged" and again.build.encoded == 0
    assert (Path(first.cache_dir) / "manifest.parquet").read_bytes() == manifest  # untouched
    assert "up to date" in capsys.readouterr().out

    second = refresh(toks[1], str(out), num_actors=1)  # a new tokenizer: a new cache beside the old
    assert second.cache_dir != first.cache_dir and second.build.encoded == 3
    assert "new tokenizer" in second.reason and second.superseded == [first.cache_dir]
    assert verify_cache(first.cache_dir).ok and verify_cache(second.cache_dir).ok  # old one still readable

    rc = main(["tokens", "refresh", "--tokenizer", toks[1], "--out", str(out), "--gc"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "up to date" in printed and f"removed {first.cache_dir}" in printed
    assert not Path(first.cache_dir).exists() and verify_cache(second.cache_dir).ok


def test_refresh_after_source_change_rebuilds_only_stale_shards(ray_local, toks, tmp_path):
    spec = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    cache_dir = Path(refresh(toks[0], str(out), spec, num_actors=1).cache_dir)
    old_rows = read_manifest(str(cache_dir))
    p = partition_of("im05", 3)  # the partition im05 belongs to (by its key)
    stale = shard_name(p)
    old_shard = (cache_dir / stale).read_bytes()

    # Change one image: only its partition's shard is stale.
    (tmp_path / "imgs" / "im05.png").write_bytes(encode_png(np.full((24, 24, 3), 200, np.uint8)))
    report = refresh(toks[0], str(out), num_actors=1)
    assert "source content changed" in report.reason
    assert report.build.encoded == 1 and report.build.reused == 2
    rows = read_manifest(str(cache_dir))
    names = [r["shard"] for r in rows]
    assert [n for i, n in enumerate(names) if i != p] == [shard_name(i) for i in range(3) if i != p]
    assert names[p].startswith(f"shard-{p:06d}-") and names[p] != stale  # a new name...
    assert (cache_dir / stale).read_bytes() == old_shard  # ...so the old cache stayed intact
    assert all((rows[i]["sha256"] == old_rows[i]["sha256"]) == (i != p) for i in range(3))
    changed = {s.key.rsplit("-", 1)[0]: s for s in read_cache(str(cache_dir))}["im05"]  # key: prefix-hash
    assert Image.open(__import__("io").BytesIO(changed.image)).getpixel((0, 0)) == (200, 200, 200)
    assert verify_cache(str(cache_dir)).ok

    refresh(toks[0], str(out), gc=True)
    assert not (cache_dir / stale).exists() and (cache_dir / names[p]).exists()
    assert verify_cache(str(cache_dir)).ok


def test_verify_catches_truncated_shard_and_flipped_byte(built, tmp_path, capsys):
    from mimflow.cli import main

    ok = verify_cache(built)
    assert ok.ok and ok.samples == 24 and ok.shards == 3, ok.summary()
    assert main(["tokens", "verify", built]) == 0

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    shard0, shard2 = bad / "shard-000000.tar", bad / "shard-000002.tar"
    shard0.write_bytes(shard0.read_bytes()[:5000])  # truncated
    data = bytearray(shard2.read_bytes())
    data[1024 + 512 + 200] ^= 0x01  # one flipped bit inside the first sample's image bytes
    shard2.write_bytes(bytes(data))
    report = verify_cache(str(bad))
    text = report.summary()
    assert not report.ok
    assert any("shard-000000.tar" in p and "bytes" in p for p in report.problems), text
    assert any("shard-000002.tar" in p and "sha256" in p for p in report.problems), text
    assert not any("shard-000001.tar" in p for p in report.problems), text
    capsys.readouterr()
    assert main(["tokens", "verify", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_catches_duplicates_and_bad_tokens(built, tmp_path):
    import pyarrow as pa

    from pipeline.token_cache import MANIFEST_SCHEMA, commit_cache, encode_sample, read_cache_info, write_shard

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    rows = read_manifest(str(bad))
    sample = read_cache(str(bad))[0]
    tokens = sample.tokens.copy()
    tokens[0, 0, 0] = 60000  # beyond the vocab
    extra = encode_sample(sample.key, sample.image, sample.fmt, tokens[:1], sample.width, sample.height,
                          sample.views[:1], sample.label)  # a duplicate key, 1 view instead of 2
    n, size, sha = write_shard(str(bad / "shard-000009.tar"), [extra])
    rows.append({**rows[0], "shard": "shard-000009.tar", "samples": n, "bytes": size, "sha256": sha})
    commit_cache(str(bad), read_cache_info(str(bad)), rows, [])
    assert pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).num_rows == 4
    problems = " | ".join(verify_cache(str(bad)).problems)
    assert "duplicate key" in problems and sample.key in problems
    assert ">= vocab size" in problems and "expected (2," in problems
    assert "samples in the shards" in problems  # 25 vs the cache info's 24


def test_show_writes_image_token_map_and_decode(built, tmp_path, capsys):
    from mimflow.cli import main

    info, _ = check_cache(built)
    key = read_cache(built)[3].key
    out = tmp_path / "tokens.png"
    assert main(["tokens", "show", built, key, "--out", str(out), "--cell", "64"]) == 0
    img = Image.open(out)
    cols = 3 if info.kind == "dvae" else 2
    assert img.size == (cols * 68, 2 * (64 + 14))  # one row per view
    assert "2 view(s) of 1 sample(s)" in capsys.readouterr().out
    assert main(["tokens", "show", built, "--n", "3", "--out", str(out)]) == 0
    assert Image.open(out).size[1] == 6 * (128 + 14)
    assert main(["tokens", "show", built, "no_such_key", "--out", str(out)]) == 2


def test_build_refuses_other_views_in_the_same_cache(built, toks):
    from pipeline.token_cache import CacheError

    with pytest.raises(CacheError, match="views=2"):
        build_cache(toks[0], "shapes?n=24&size=32&seed=5&partition_size=8", str(Path(built).parent), 1)


def test_stage1_config_flat_and_nested(tmp_path):
    from tokenizer.stage1 import Stage1Config, load_stage1_config

    cfg = load_stage1_config(None, ["tokens.views=2", "tokens.out=/x/tokens"])
    assert isinstance(cfg, Stage1Config) and cfg.tokens.views == 2 and cfg.tokens.out == "/x/tokens"
    nested = tmp_path / "s1.yaml"
    nested.write_text("tokens:\n  batch_size: 7\n  source: shapes?n=10\n")
    cfg = load_stage1_config(nested)
    assert cfg.tokens.batch_size == 7 and cfg.tokens.source == "shapes?n=10"
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="tokens.view"):
        load_stage1_config(None, ["tokens.view=2"])


@pytest.mark.slow
def test_stage1_entry_point_trains_then_builds_then_is_current(ray_local, tmp_path, capsys):
    """``python -m tokenizer``: train a tiny dVAE (in-process), build its cache; a rerun does neither."""
    import json

    from tokenizer.__main__ import main

    recipe = tmp_path / "stage1.yaml"
    recipe.write_text(
        "tokenizer:\n"
        "  source: shapes?n=24&size=16&partition_size=8\n"
        f"  out: {tmp_path / 'tok'}\n"
        "  model: {kind: dvae, vocab_size: 32, grid: 4, input_size: 16, width: 8, depth: 1, code_dim: 8}\n"
        "  epochs: 1\n  batch_size: 8\n  num_workers: 0\n  heldout_size: 8\n"
        f"tokens:\n  out: {tmp_path / 'tokens'}\n  actors: 1\n"
    )
    assert main(["--config", str(recipe)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 24 and result["encoded_shards"] == 3 and not result["up_to_date"]
    assert verify_cache(result["cache"]).ok
    assert main(["--config", str(recipe), "--set", "tokens.batch_size=4"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["up_to_date"] and again["cache"] == result["cache"] and again["encoded_shards"] == 0
