from __future__ import annotations

import gzip
import io
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.images import BadImageError, decode_rgb
from pipeline.shapes import CLASSES, render_shape
from pipeline.source_tar import expand_braces
from pipeline.sources import BadInput, SourceError, open_source, read_all


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def class_folder(tmp_path):
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            (root / name / f"img.{i}.jpg").write_bytes(_jpeg(c * 10 + i))
    (root / "dog" / "broken.jpg").write_bytes(_jpeg(99)[:200])  # truncated JPEG
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def _decoded(source):
    good, bad = [], list()
    for item in source:
        if isinstance(item, BadInput):
            bad.append(item)
            continue
        try:
            decode_rgb(item.data)
            good.append(item)
        except BadImageError as e:
            bad.append(BadInput(item.key, item.origin, e.reason))
    return good, bad


def test_folder_labels_keys_and_errors(class_folder):
    src = open_source(str(class_folder))
    assert src.classes == ["cat", "dog"] and len(src) == 12
    good, bad = _decoded(src)
    assert len(good) == 10
    assert {s.label for s in good} == {0, 1}
    assert all("." not in s.key for s in good)
    assert len({s.key for s in good}) == 10
    reasons = {b.key: b.reason for b in bad}
    assert any("not an image file" in r for r in reasons.values())
    assert any("cannot decode" in r or "truncated" in r for r in reasons.values())
    assert all(str(class_folder) in b.origin for b in bad)


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_jpeg(i))  # wrong extension, still decodable
    src = open_source(str(tmp_path))
    good, bad = read_all(src)
    assert src.classes is None and not bad
    assert [s.label for s in good] == [None, None, None]


def test_folder_split_and_missing(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "x.jpg").write_bytes(_jpeg(1))
    assert len(open_source(f"{tmp_path}?split=val")) == 1
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="unknown source option"):
        open_source(f"{tmp_path}?splt=val")


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_with_brace_pattern(tmp_path):
    for t in range(2):
        samples = []
        for i in range(3):
            samples += [(f"s{t}{i}.jpg", _jpeg(t * 3 + i)), (f"s{t}{i}.cls", str(i % 2).encode())]
        samples.append((f"junk{t}.txt", b"hello"))
        _write_tar(tmp_path / f"part-{t:03d}.tar", samples)
    src = open_source(str(tmp_path / "part-{000..001}.tar"))
    good, bad = _decoded(src)
    assert len(good) == 6 and len(bad) == 2
    assert sorted(s.label for s in good) == [0, 0, 0, 0, 1, 1]
    assert all("no image member" in b.reason for b in bad)
    assert src.classes == ["0", "1"]
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "part-{000..002}.tar"))


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source(tmp_path, gz):
    images = np.stack([render_shape(i, size=28)[0].mean(-1) for i in range(7)]).astype(np.uint8)
    labels = np.arange(7) % 3
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz)
    src = open_source(f"idx:{tmp_path}?split=test")
    good, bad = _decoded(src)
    assert not bad and len(good) == 7
    assert [s.label for s in good] == labels.tolist()
    pixels = np.asarray(Image.open(io.BytesIO(good[3].data)))
    assert np.array_equal(pixels, images[3])  # lossless
    with pytest.raises(SourceError, match="no train-images"):
        open_source(f"idx:{tmp_path}")


def test_idx_corrupt_header(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"\x00" * 5)
    with pytest.raises(SourceError, match="header promises"):
        open_source(str(tmp_path))


def test_shapes_deterministic_and_labelled():
    a = read_all(open_source("shapes?n=30&size=40&seed=3"))[0]
    b = read_all(open_source("shapes?n=30&size=40&seed=3"))[0]
    c = read_all(open_source("shapes?n=30&size=40&seed=4"))[0]
    assert [s.data for s in a] == [s.data for s in b]
    assert [s.data for s in a] != [s.data for s in c]
    assert decode_rgb(a[0].data).size == (40, 40)
    assert len(CLASSES) >= 10
    labels = [render_shape(i, size=16)[1] for i in range(300)]
    assert len(set(labels)) == len(CLASSES)
    test = read_all(open_source("shapes?n=30&size=40&seed=3&split=test"))[0]
    assert {s.data for s in test}.isdisjoint({s.data for s in a})


def test_fingerprint_stable_and_detects_change(class_folder):
    fp = open_source(str(class_folder)).fingerprint()
    assert fp == open_source(str(class_folder)).fingerprint()
    target = class_folder / "cat" / "img.0.jpg"
    target.write_bytes(_jpeg(123) + b"\x00")  # new content, new size
    fp2 = open_source(str(class_folder)).fingerprint()
    assert fp2 != fp
    (class_folder / "cat" / "extra.jpg").write_bytes(_jpeg(5))
    assert open_source(str(class_folder)).fingerprint() not in (fp, fp2)
    assert open_source("shapes?n=10").fingerprint() != open_source("shapes?n=11").fingerprint()
    # shapes' n is how many to generate (2000 when absent), not a subset: one fingerprint for one listing,
    # the same as before subsets existed, so tokenizers trained on `shapes?n=...` do not turn stale
    assert open_source("shapes?n=2000").fingerprint() == open_source("shapes").fingerprint() == "3d21f36765495bdd"
    assert open_source("shapes?n=5&sample=2").fingerprint() != open_source("shapes?n=5").fingerprint()


def test_partitions_deterministic_and_cover_everything(class_folder):
    src = open_source(f"{class_folder}?partition_size=5")
    parts = src.partitions()
    from pipeline.sources import partition_of

    assert len(parts) == 3 and sum(p.size for p in parts) == 12  # ceil(12 / 5) partitions, by key hash
    for p in parts:
        in_part = [it.key for it in src.iter_partition(p)]
        assert in_part == sorted(in_part) and all(partition_of(k, 3) == p.index for k in in_part)
    keys = [it.key for p in parts for it in src.iter_partition(p)]
    again = [it.key for p in open_source(f"{class_folder}?partition_size=5").partitions()
             for it in src.iter_partition(p)]
    assert keys == again and len(set(keys)) == len(keys) == 12


def test_expand_braces():
    assert expand_braces("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
