from __future__ import annotations

import json

from PIL import Image

from mimflow.cli import main


def test_preview_grid_and_summary(tmp_path, capsys):
    out = tmp_path / "grid.png"
    summary = tmp_path / "summary.json"
    rc = main(["data", "preview", "shapes?n=20&size=32", "--out", str(out), "--n", "10",
               "--cell", "40", "--json", str(summary)])
    assert rc == 0
    img = Image.open(out)
    assert img.size == (8 * 40, 2 * (40 + 12))  # 10 images, 8 columns, caption strip under each row
    text = capsys.readouterr().out
    assert "20 items" in text and "20 images, 0 errors" in text and "32x32 (20)" in text
    doc = json.loads(summary.read_text())
    assert sum(doc["class_counts"].values()) == 20 and doc["errors"] == []


def test_preview_reports_errors(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "b.png")
    rc = main(["data", "preview", str(tmp_path), "--out", str(tmp_path / "g.png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "1 images, 1 errors" in text and "error: a-" in text and "30x20 (1)" in text


def test_preview_missing_source_is_a_clear_error(tmp_path, capsys):
    rc = main(["data", "preview", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")])
    assert rc == 2
    assert "image folder not found" in capsys.readouterr().err


def test_preview_out_that_is_no_image_name_is_a_clear_error(tmp_path, capsys):
    rc = main(["data", "preview", "shapes?n=2&size=16", "--out", str(tmp_path / "grid.txt")])
    assert rc == 2 and "grid.txt: not an image file name" in capsys.readouterr().err
    assert not (tmp_path / "grid.txt").exists()
