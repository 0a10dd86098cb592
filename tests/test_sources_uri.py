"""Every source kind reads from a bucket (a real S3-compatible server on loopback) the same as from disk."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import storage
from pipeline.token_cache import shard_bytes
from pipeline.sources import SourceError, open_source, read_all


def _upload(local_dir, uri: str) -> None:
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(f"{uri}/{path.relative_to(local_dir).as_posix()}", path.read_bytes())


def _same(a, b) -> None:
    (ga, ba), (gb, bb) = read_all(a), read_all(b)
    assert [(s.key, s.data, s.label) for s in ga] == [(s.key, s.data, s.label) for s in gb]
    assert [(x.key, x.reason) for x in ba] == [(x.key, x.reason) for x in bb]
    assert a.classes == b.classes and len(ga) > 0


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A labelled folder (2 classes, 6 images, one non-image file) made from the shapes generator."""
    root = tmp_path_factory.mktemp("folder")
    good, _ = read_all(open_source("shapes?n=6&size=16&seed=1"))
    for i, s in enumerate(good):
        (root / f"c{s.label % 2}").mkdir(exist_ok=True)
        (root / f"c{s.label % 2}" / f"img {i}.png").write_bytes(s.data)
    (root / "c0" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(good[0].data)
    return root, good


def test_folder_under_a_prefix(images, s3_server):
    root, _ = images
    bucket = s3_server("mimflow-src-folder")
    _upload(root, bucket + "/imgs")
    _same(open_source(str(root)), open_source(bucket + "/imgs"))
    assert open_source(f"folder:{bucket}/imgs").kind == "folder"
    with pytest.raises(SourceError, match="no files found under s3://mimflow-src-folder/nothing"):
        open_source(bucket + "/nothing")


def test_tars_by_brace_range_and_glob(images, tmp_path, s3_server):
    _, good = images
    local = tmp_path / "tars"
    local.mkdir()
    for t in range(2):
        members = [{"__key__": f"s{t}{i}", "png": s.data, "cls": str(s.label).encode()} for i, s in enumerate(good[t::2])]
        (local / f"train-{t:03d}.tar").write_bytes(shard_bytes(members))
    bucket = s3_server("mimflow-src-tars")
    _upload(local, bucket + "/wds")
    on_disk = open_source(str(local / "train-{000..001}.tar"))
    _same(on_disk, open_source(bucket + "/wds/train-{000..001}.tar"))
    _same(on_disk, open_source(f"wds:{bucket}/wds/train-*.tar"))
    with pytest.raises(SourceError, match="tar file.s. not found: s3://mimflow-src-tars/wds/train-002.tar"):
        open_source(bucket + "/wds/train-{001..002}.tar")


def test_idx_files(tmp_path, s3_server):
    local = tmp_path / "mnist"
    local.mkdir()
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8), dtype=np.uint8)
    (local / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + np.array([5, 8, 8], ">u4").tobytes() + images.tobytes())
    (local / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + bytes([0, 1, 2, 1, 0]))
    bucket = s3_server("mimflow-src-idx")
    _upload(local, bucket + "/mnist")
    _same(open_source(f"idx:{local}"), open_source(f"idx:{bucket}/mnist"))
    assert open_source(bucket + "/mnist").kind == "idx"
