"""A token cache that can be trusted (issue #15): refresh by content, partitions by key, one commit
point, a gc that deletes only its own files, a loader that checks what it reads, a verify that exits 0.
Real Ray, real tars, real Parquet; kills are simulated by failing a write (atomic writes leave on disk
exactly what a kill at that moment would)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.token_cache import check_cache, read_manifest
from test_cache_support import make_tokenizer, read_cache
from tokenizer.cache_ops import refresh
from tokenizer.cache_verify import verify_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok", seed=0)


def _bmp(value: int) -> bytes:
    """A 24x24 BMP: its size does not depend on its pixels, so versions of one image differ only in content."""
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(buf, format="BMP")
    return buf.getvalue()


def _folder(root: Path, n: int = 12) -> str:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"im{i:02d}.bmp").write_bytes(_bmp(10 * i))
    return f"{root}?partition_size=4"


def _consistent(cache_dir: str) -> None:
    """Every manifest row's sha256 is its file's, and verify passes."""
    for r in read_manifest(cache_dir):
        assert hashlib.sha256(Path(cache_dir, r["shard"]).read_bytes()).hexdigest() == r["sha256"], r["shard"]
    report = verify_cache(cache_dir)
    assert report.ok, report.summary()


@pytest.mark.slow
def test_refresh_a_b_c_a_commits_the_shard_it_lists(ray_local, tok, tmp_path):
    """#15.1: A -> B -> C -> A; the last refresh must not keep A's old record over C's bytes."""
    spec = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    image = tmp_path / "imgs" / "im05.bmp"
    original = image.read_bytes()
    cache_dir = refresh(tok, str(out), spec, num_actors=1).cache_dir
    for value in (200, 100):  # B, then C: same size as A
        image.write_bytes(_bmp(value))
        refresh(tok, str(out), num_actors=1)
        _consistent(cache_dir)
    image.write_bytes(original)  # back to A
    refresh(tok, str(out), num_actors=1)
    _consistent(cache_dir)
    assert {s.key.rsplit("-", 1)[0]: s.image for s in read_cache(cache_dir)}["im05"] == original  # key: prefix-hash


@pytest.mark.slow
def test_inserting_one_image_rebuilds_one_partition(ray_local, tok, tmp_path):
    """#15.4: partitions by key hash, their count fixed for the cache: an insertion touches one."""
    from pipeline.sources import open_source

    spec = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    first = refresh(tok, str(out), spec, num_actors=1)
    assert first.build.partitions == 3
    (tmp_path / "imgs" / "im05b.bmp").write_bytes(_bmp(77))  # in the middle of the listing
    report = refresh(tok, str(out), num_actors=1)
    assert (report.build.encoded, report.build.reused, report.build.partitions) == (1, 2, 3)
    info, _ = check_cache(report.cache_dir)
    assert info.partitions == 3 and info.samples == 13
    _consistent(report.cache_dir)
    # Each partition's items ordered by key.
    for part in open_source(spec).partitions(3):
        keys = [item.key for item in open_source(spec).iter_partition(part)]
        assert keys == sorted(keys)


def test_key_partitions_insertions_deletions_changes_touch_at_most_k(tmp_path):
    """#15.4 at scale, no Ray: 100 images in 10 partitions; one insertion changes exactly one partition."""
    from pipeline.sources import open_source

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(100):
        (root / f"im{i:03d}.bmp").write_bytes(_bmp(i))
    spec = f"{root}?partition_size=10"

    def members() -> list[list[str]]:
        src = open_source(spec)
        return [[src._key(src._listing[p]) for p in part.positions] for part in src.partitions(10)]

    before = members()
    assert len(before) == 10 and sum(map(len, before)) == 100
    (root / "im050x.bmp").write_bytes(_bmp(1))
    after = members()
    assert sum(a != b for a, b in zip(before, after)) == 1
    for name in ("im010.bmp", "im020.bmp", "im030.bmp"):  # k = 3 deletions: at most 3 partitions
        (root / name).unlink()
    assert sum(a != b for a, b in zip(before, members())) <= 4


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_refresh_killed_in_the_commit_leaves_the_old_or_the_new_cache(ray_local, tok, tmp_path, monkeypatch, fail_at):
    """#15.7: a refresh dying at any write of its commit leaves a cache that verify and check_cache
    both accept, and that is the old one or the new one, never a mix."""
    spec = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    cache_dir = refresh(tok, str(out), spec, num_actors=1).cache_dir
    old_rows = read_manifest(cache_dir)
    (tmp_path / "imgs" / "broken.bmp").write_bytes(b"BM not really")  # one more item (an error row)
    (tmp_path / "imgs" / "im03.bmp").write_bytes(_bmp(250))

    real = storage.write_bytes_atomic
    calls = {"n": 0}

    def dying_write(location, data):  # the driver's writes are the commit's (actors write shards, records)
        if calls["n"] == fail_at:
            raise KeyboardInterrupt(f"killed before writing {location}")
        calls["n"] += 1
        return real(location, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", dying_write)
    try:
        refresh(tok, str(out), num_actors=1)
        killed = False
    except KeyboardInterrupt:
        killed = True
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    report = verify_cache(cache_dir)
    info, rows = check_cache(cache_dir)  # accepted...
    assert report.ok, report.summary()  # ...and verify agrees
    strip = lambda rs: [{k: v for k, v in r.items() if k != "created"} for r in rs]  # noqa: E731
    if killed:
        assert strip(rows) == strip(old_rows) and info.source_size == 12  # the old cache, whole
    else:
        assert info.source_size == 13
    refresh(tok, str(out), num_actors=1)  # and a rerun completes the new one
    info, _ = check_cache(cache_dir)
    assert info.source_size == 13 and info.errors == 1 and verify_cache(cache_dir).ok


@pytest.mark.slow
def test_gc_removes_only_its_own_files_and_a_rerun_its_temporaries(ray_local, tok, tmp_path):
    """#15.8: a user's notes survive --gc (in the kept cache and in a superseded one); a successful
    rerun removes the temporary a killed commit left."""
    spec = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    cache_dir = Path(refresh(tok, str(out), spec, num_actors=1).cache_dir)
    other = out / "0123456789abcdef"
    shutil.copytree(cache_dir, other)  # a superseded tokenizer's cache
    for d in (cache_dir, other):
        (d / "my_notes.txt").write_text("keep me")
    leftover = cache_dir / "manifest.parquet.tmp-0badf00d"
    leftover.write_bytes(b"half a manifest")
    record_tmp = cache_dir / "_build" / "part-000000-0123456789abcdef.json.tmp-0badf00d"
    record_tmp.write_text("{")

    again = refresh(tok, str(out))  # nothing to rebuild: still cleans up after itself
    assert again.up_to_date and not leftover.exists() and not record_tmp.exists()

    (tmp_path / "imgs" / "im01.bmp").write_bytes(_bmp(99))
    report = refresh(tok, str(out), num_actors=1, gc=True)
    assert (cache_dir / "my_notes.txt").read_text() == "keep me"
    assert (other / "my_notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in other.iterdir()) == ["my_notes.txt"]  # all of ours went, the notes stayed
    listed = {r["shard"] for r in read_manifest(str(cache_dir))}
    assert {p.name for p in cache_dir.glob("shard-*.tar")} == listed
    assert len(list(cache_dir.glob("errors-*.parquet"))) == 1
    assert not any(str(p).endswith("my_notes.txt") for p in report.removed)
    _consistent(str(cache_dir))


@pytest.mark.slow
def test_tokens_verify_exits_zero_every_time(ray_local, tok, tmp_path):
    """#15.10: a verify that found nothing exits 0, every run (it aborted at exit 4 times in 26)."""
    cache_dir = refresh(tok, str(tmp_path / "out"), _folder(tmp_path / "imgs"), num_actors=1).cache_dir
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    codes = []
    for _ in range(10):
        proc = subprocess.run([sys.executable, "-m", "mimflow", "tokens", "verify", cache_dir], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        codes.append((proc.returncode, proc.stderr.strip()[-200:]))
        assert proc.stdout.startswith("OK"), proc.stdout + proc.stderr
    assert codes == [(0, "")] * 10
