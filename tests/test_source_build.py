"""Acceptance (issue #15): a cache build over every kind of bad and unusual input accounts for every
file (samples + error rows = files present, hidden ones excluded) and drops no valid image."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.token_cache import check_cache, read_errors
from test_cache_support import make_tokenizer, read_cache
from test_images import jpeg_exif_rotated, png_16bit, png_bomb


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _valid_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))
    return {
        "16bit.png": png_16bit()[0],
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "palette.png": _save(rgb.convert("P")),
        "rgba.png": _save(rgb.convert("RGBA")),
        "onebit.png": _save(rgb.convert("1")),
        "gray.jpg": _save(rgb.convert("L"), "JPEG"),
        "exif.jpg": jpeg_exif_rotated(),
        "tiny.png": _save(Image.new("RGB", (1, 1), (9, 9, 9))),
        "a b.jpg": _save(rgb, "JPEG"),
        "a_b.jpg": _save(rgb.rotate(90), "JPEG"),
        "a.b.jpg": _save(rgb.rotate(180), "JPEG"),
        "caf\u00e9 \u732b.png": _save(rgb.rotate(45)),
        "cafe\u0301 \u732b.png": _save(rgb.rotate(30)),
    }


def _bad_files() -> dict[str, bytes]:
    whole = _save(Image.new("RGB", (40, 40), (200, 10, 10)))
    return {
        "empty.jpg": b"",
        "truncated.png": whole[: len(whole) // 2],
        "text.jpg": b"this is not a jpeg",
        "notes.txt": b"not an image at all",
        "bomb.png": png_bomb(),
    }


def _files_present(root: Path) -> list[Path]:
    """Every non-hidden entry that is not a folder (links counted as themselves, not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        d = Path(dirpath)
        out += [d / n for n in filenames if not n.startswith(".")]
        out += [d / n for n in dirnames if (d / n).is_symlink()]  # a linked folder here is a loop
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok", seed=0)


def _build(tok_dir: str, spec: str, out: Path, capsys) -> tuple[str, dict, list[dict]]:
    from mimflow.cli import main

    assert main(["tokens", "build", "--tokenizer", tok_dir, "--source", spec, "--out", str(out), "--actors", "1"]) == 0
    cache_dir = capsys.readouterr().out.strip().splitlines()[-1]
    info, _ = check_cache(cache_dir)
    errors = read_errors(cache_dir, info)
    assert main(["tokens", "verify", cache_dir]) == 0  # a fresh build always verifies
    capsys.readouterr()
    return cache_dir, info, errors


@pytest.mark.slow
def test_folder_build_accounts_for_every_file(ray_local, tok_dir, tmp_path, capsys):
    root = tmp_path / "data"
    valid = _valid_images()
    for cls in ("odd", "plain"):
        (root / cls).mkdir(parents=True)
    for name, data in {**valid, **_bad_files()}.items():
        (root / "odd" / name).write_bytes(data)
    (root / "plain" / "p.png").write_bytes(_save(Image.new("RGB", (16, 16), (1, 2, 3))))
    (root / "beside.png").write_bytes(_save(Image.new("RGB", (8, 8))))  # no class: an error row
    (root / "odd" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "odd" / "loop").symlink_to(root / "odd", target_is_directory=True)
    for hidden in (".cache", ".ipynb_checkpoints"):
        (root / hidden).mkdir()
        (root / hidden / "h.png").write_bytes(valid["tiny.png"])
    (root / "odd" / ".DS_Store").write_bytes(b"\x00")

    present = _files_present(root)
    assert len(present) == len(valid) + 5 + 1 + 1 + 2  # valid, bad, plain, beside, two links
    cache_dir, info, errors = _build(tok_dir, f"{root}?partition_size=4", tmp_path / "cache", capsys)
    samples = read_cache(cache_dir)
    assert len(samples) + len(errors) == len(present) == info.samples + info.errors
    # No valid image dropped: every one is in the cache with its bytes unchanged.
    by_bytes = {s.image: s for s in samples}
    for name, data in valid.items():
        assert data in by_bytes, name
    assert len({s.key for s in samples}) == len(samples) == len(valid) + 1
    assert {Path(e["source"]).name for e in errors} == {*_bad_files(), "beside.png", "gone.png", "loop"}
    reasons = {Path(e["source"]).name: e["reason"] for e in errors}
    assert "decompression bomb" in reasons["bomb.png"] and "empty" in reasons["empty.jpg"]
    assert "loop" in reasons["loop"] and "dangling" in reasons["gone.png"]
    # The rotated image is stored portrait (EXIF applied), the 16-bit one at full size.
    exif = by_bytes[valid["exif.jpg"]]
    assert exif.width == 10 and exif.height == 20


def _tar(path: Path, members: list) -> None:
    with tarfile.open(path, "w") as tf:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if len(m) == 2:
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
            else:
                info.type, info.linkname = m[1], m[2]
                tf.addfile(info)


@pytest.mark.slow
def test_tar_build_accounts_for_every_member(ray_local, tok_dir, tmp_path, capsys):
    valid = _valid_images()
    good = [(f"k{i:02d}.{name.rsplit('.', 1)[1]}", data) for i, (name, data) in enumerate(valid.items())]
    members = [m for i, (name, data) in enumerate(good) for m in ((name, data), (f"k{i:02d}.cls", str(i % 3).encode()))]
    bad = [
        ("bad00.png", _bad_files()["truncated.png"]),  # undecodable image
        ("bad01.png", valid["tiny.png"]), ("bad01.cls", b"-5"),  # label out of range
        ("bad02.png", valid["tiny.png"]), ("bad02.cls", b"1000000000000"),
        ("bad03.txt", b"no image here"),  # no image member
        ("bad04.png", tarfile.SYMTYPE, "/etc/passwd"),
        ("bad05.png", tarfile.LNKTYPE, "k00.png"),
        ("../bad06.png", valid["tiny.png"]),
        ("/bad07.png", valid["tiny.png"]),
    ]
    hidden = [(".cache/h.png", valid["tiny.png"]), ("._k00.png", b"AppleDouble")]
    tar = tmp_path / "shard-000000.tar"
    _tar(tar, members + bad + hidden)
    cache_dir, info, errors = _build(tok_dir, f"{tar}?partition_size=5", tmp_path / "cache", capsys)
    samples = read_cache(cache_dir)
    assert len(samples) == len(valid) and len(errors) == 8 == info.errors
    assert {s.image for s in samples} == set(valid.values())
    assert sorted(s.label for s in samples) == sorted(i % 3 for i in range(len(valid)))
    named = {e["source"].split("#", 1)[1] for e in errors}
    assert named == {"bad00", "bad01", "bad02", "bad03", "bad04.png", "bad05.png", "../bad06.png", "/bad07.png"}
