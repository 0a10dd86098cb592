"""Sources account for every input: unique keys, hidden files, symlinks, bad tar members, labels, subsets."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.sources import SourceError, open_source, read_all, with_params

REPO = Path(__file__).resolve().parent.parent


def _png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def test_colliding_names_get_unique_stable_keys(tmp_path):
    cls = tmp_path / "cls"
    cls.mkdir()
    names = ["a b.jpg", "a_b.jpg", "a.b.jpg", "a_b.png", "caf\u00e9.png", "cafe\u0301.png", "\u732b.png"]
    for i, name in enumerate(names):
        (cls / name).write_bytes(_png(i * 30))
    good, bad = read_all(open_source(str(tmp_path)))
    assert not bad and len(good) == len(names)
    keys = [s.key for s in good]
    assert len(set(keys)) == len(names)  # every distinct file its own key
    assert all("." not in k and "/" not in k and k.isascii() for k in keys)
    # Stable: the same file keeps its key when other files come and go.
    before = {s.origin: s.key for s in good}
    (cls / "a-b.jpg").write_bytes(_png(200))
    (cls / "a b.jpg").unlink()
    after = {s.origin: s.key for s in read_all(open_source(str(tmp_path)))[0]}
    assert all(after[o] == k for o, k in before.items() if o in after)
    assert len(set(after.values())) == len(after) == len(names)
    assert before[str(cls / "a_b.jpg")].startswith("cls_a_b-")  # readable prefix


def test_two_items_with_one_key_fail_naming_both(tmp_path):
    tar = tmp_path / "a.tar"
    _write_tar(tar, [("x.png", _png(1))])
    with pytest.raises(SourceError, match=r"a\.tar#x.*a\.tar#x"):
        open_source(f"wds:{tar}::{tar}")  # the same tar twice: every item twice


def test_hidden_files_and_folders_are_skipped_everywhere(tmp_path, capsys):
    from mimflow.cli import main

    for d in ("cat", "dog", ".cache", ".ipynb_checkpoints", "cat/.thumbs"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / "cat" / "a.png").write_bytes(_png(1))
    (tmp_path / "dog" / "b.png").write_bytes(_png(2))
    (tmp_path / ".cache" / "c.png").write_bytes(_png(3))
    (tmp_path / ".ipynb_checkpoints" / "d-checkpoint.png").write_bytes(_png(4))
    (tmp_path / "cat" / ".thumbs" / "e.png").write_bytes(_png(5))
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    src = open_source(str(tmp_path))
    assert src.classes == ["cat", "dog"] and len(src) == 2
    assert main(["data", "preview", str(tmp_path), "--out", str(tmp_path.parent / "g.png")]) == 0
    assert "2 images, 0 errors" in capsys.readouterr().out
    # The same rule in tars: hidden members (and macOS ._ files) are skipped, './' is not hidden.
    tar = tmp_path.parent / "h.tar"
    _write_tar(tar, [("./k1.png", _png(1)), (".cache/k2.png", _png(2)), ("._k3.png", b"junk"), ("d/.k4.png", _png(4))])
    good, bad = read_all(open_source(str(tar)))
    assert [s.origin.split("#")[-1] for s in good] == ["k1"] and not bad


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_symlinks_followed_loops_and_dangling_are_error_rows(tmp_path):
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "o.png").write_bytes(_png(9))
    (root / "cat" / "a.png").write_bytes(_png(1))
    (root / "cat" / "linked.png").symlink_to(outside / "o.png")  # a file link: followed
    (root / "dog").symlink_to(outside, target_is_directory=True)  # a class folder link: followed
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)  # a loop
    (root / "cat" / "gone.png").symlink_to(tmp_path / "missing.png")  # dangling
    src = open_source(str(root))
    assert src.classes == ["cat", "dog"]
    good, bad = read_all(src)
    assert sorted(Path(s.origin).name for s in good) == ["a.png", "linked.png", "o.png"]
    assert {s.label for s in good if Path(s.origin).name == "o.png"} == {1}
    reasons = {Path(b.origin).name: b.reason for b in bad}
    assert set(reasons) == {"loop", "gone.png"}
    assert "loop" in reasons["loop"] and "dangling" in reasons["gone.png"]


def _write_tar(path, members):
    """members: (name, bytes) regular files, or (name, TarInfo-type, linkname) links."""
    with tarfile.open(path, "w") as tf:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if len(m) == 2:
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
            else:
                info.type, info.linkname = m[1], m[2]
                tf.addfile(info)


def test_tar_links_and_path_traversal_members_are_error_rows(tmp_path):
    tar = tmp_path / "bad.tar"
    _write_tar(tar, [
        ("ok.png", _png(1)), ("ok.cls", b"0"),
        ("sym.png", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard.png", tarfile.LNKTYPE, "ok.png"),
        ("../evil.png", _png(2)),
        ("/abs/evil2.png", _png(3)),
        ("d/../../evil3.png", _png(4)),
        ("dev.png", tarfile.CHRTYPE, ""),
    ])
    src = open_source(str(tar))
    good, bad = read_all(src)
    assert [s.origin for s in good] == [f"{tar}#ok"]
    by_member = {b.origin.split("#", 1)[1]: b.reason for b in bad}
    assert set(by_member) == {"sym.png", "hard.png", "../evil.png", "/abs/evil2.png", "d/../../evil3.png", "dev.png"}
    assert "symlink" in by_member["sym.png"] and "hard link" in by_member["hard.png"]
    assert all("unsafe path" in by_member[n] for n in ("../evil.png", "/abs/evil2.png", "d/../../evil3.png"))
    assert len({b.key for b in bad} | {s.key for s in good}) == 7


def test_out_of_range_and_non_integer_labels_are_error_rows(tmp_path, capsys):
    from mimflow.cli import main

    tar = tmp_path / "labels.tar"
    members = []
    for i, cls in enumerate([b"1", b"-5", b"1000000000000", b"cat", b"2.5", b"\xff", b" 2\n"]):
        members += [(f"s{i}.png", _png(i * 20)), (f"s{i}.cls", cls)]
    _write_tar(tar, members)
    src = open_source(str(tar))
    assert src.classes == ["0", "1", "2"]
    good, bad = read_all(src)
    assert {s.origin.split("#")[1]: s.label for s in good} == {"s0": 1, "s6": 2}
    assert sorted(b.origin.split("#")[1] for b in bad) == ["s1", "s2", "s3", "s4", "s5"]
    assert all("label" in b.reason for b in bad)
    assert main(["data", "preview", str(tar), "--out", str(tmp_path / "g.png")]) == 0
    assert "2 images, 5 errors" in capsys.readouterr().out


def test_subsets_of_any_source(tmp_path):
    import numpy as np

    from test_sources import _write_idx

    images = np.arange(30 * 4 * 4, dtype=np.uint8).reshape(30, 4, 4)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=False)
    full = open_source(f"idx:{tmp_path}")
    head = open_source(f"idx:{tmp_path}?n=10")
    assert len(full) == 30 and len(head) == 10
    assert [s.key for s in read_all(head)[0]] == [s.key for s in read_all(full)[0]][:10]
    a = open_source(f"idx:{tmp_path}?sample=7&subset_seed=1")
    b = open_source(f"idx:{tmp_path}?sample=7&subset_seed=1")
    c = open_source(f"idx:{tmp_path}?sample=7&subset_seed=2")
    ka, kc = [s.key for s in read_all(a)[0]], [s.key for s in read_all(c)[0]]
    assert ka == [s.key for s in read_all(b)[0]] and len(ka) == 7 and ka != kc
    assert ka == sorted(ka)  # a subset keeps the source's order
    fps = {s.fingerprint() for s in (full, head, a, c, open_source(f"idx:{tmp_path}?n=11"))}
    assert len(fps) == 5 and a.fingerprint() == b.fingerprint()
    # The same options on folders, tars and shapes.
    for i in range(6):
        (tmp_path / "f" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "f" / f"{i}.png").write_bytes(_png(i))
    assert len(open_source(f"{tmp_path / 'f'}?n=4")) == 4 and len(open_source(f"{tmp_path / 'f'}?sample=3")) == 3
    _write_tar(tmp_path / "t.tar", [(f"k{i}.png", _png(i)) for i in range(5)])
    assert len(open_source(f"{tmp_path / 't.tar'}?sample=2&subset_seed=4")) == 2
    assert len(open_source("shapes?n=40&sample=5")) == 5 and len(open_source("shapes?n=3000")) == 3000
    both = [s.key for s in read_all(open_source(f"idx:{tmp_path}?n=12&sample=4&subset_seed=1"))[0]]
    assert len(both) == 4 and set(both) <= {s.key for s in read_all(head)[0]} | {"train-000010", "train-000011"}
    with pytest.raises(SourceError, match="sample"):
        open_source(f"idx:{tmp_path}?sample=many")
    with pytest.raises(SourceError, match="subset_seed"):
        open_source(f"idx:{tmp_path}?subset_seed=3")


def test_with_params_edits_one_spec():
    assert with_params("/d/imgs", split="val") == "/d/imgs?split=val"
    assert with_params("shapes?n=5&size=32", n=7, split="test") == "shapes?n=7&size=32&split=test"
    assert with_params("/d/s-{000..009}.tar?n=4", n=None) == "/d/s-{000..009}.tar"


def test_opening_a_source_does_not_load_torch(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    code = (
        "import sys; from pipeline.sources import open_source, read_all; from pipeline.images import decode_rgb; "
        f"s = read_all(open_source({str(tmp_path)!r}))[0]; decode_rgb(s[0].data); "
        "import pipeline.views; print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"

