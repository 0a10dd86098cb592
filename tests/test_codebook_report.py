"""The codebook report end to end on real shards and real Ray: figures, files, HTML, compare, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval.codebook.report import choose_mosaic_codes, codebook_report, pick_agreement_shards
from pipeline.errors import StageError
from mimflow.cli import main
from pipeline.images import encode_png
from cache_fixture import commit_shards
from pipeline.token_cache import CacheError, encode_sample
from pipeline.views import centre_view

VOCAB = 8


def make_cache(root: Path, shards: list[list[tuple[np.ndarray, int | None]]], *, vocab: int = VOCAB, size: int = 16,
               input_size: int = 16, tokenizer_id: str = "tok0001", kind: str = "vqkd", classes=None, images=None,
               manifest: bool = True) -> Path:
    """A real cache: one shard per entry of ``shards``, each a list of (tokens [V, h, w], label)."""
    cache = root / tokenizer_id
    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shard_members, n = [], 0
    for si, samples in enumerate(shards):
        members = []
        for tokens, label in samples:
            img = images[n] if images is not None else rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            views = [centre_view(img.shape[1], img.shape[0])] * tokens.shape[0]
            members.append(encode_sample(f"s{n:05d}", encode_png(img), "png", tokens, img.shape[1], img.shape[0], views, label))
            n += 1
        shard_members.append(members)
    grid = list(shards[0][0][0].shape[1:]) if shards and shards[0] else [2, 2]
    commit_shards(str(cache), shard_members, tokenizer_id=tokenizer_id, kind=kind, vocab_size=vocab, grid=grid,
                  input_size=input_size, views=1, classes=classes, manifest=manifest)
    return cache


def T(*rows) -> np.ndarray:
    """tokens [1, 2, 2] from a flat list of 4 ids."""
    return np.array(rows, dtype=np.uint16).reshape(1, 2, 2)


# The hand-worked dataset of test_codebook_stats: shard A holds codes 0 x5, 1 x2, 2 x1; shard B code 3 x4.
SHARDS = [[(T(0, 0, 1, 1), 0), (T(0, 0, 0, 2), 1)], [(T(3, 3, 3, 3), 1)]]


def _refs(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_report_from_cache_alone(tmp_path, ray_local, capsys):
    cache = make_cache(tmp_path / "tokens", SHARDS, classes=["zero", "one"])
    out = tmp_path / "report"
    rep = codebook_report(str(cache), str(out), sample=0)
    u = rep["usage"]
    h = -(5 / 12 * math.log2(5 / 12) + 2 / 12 * math.log2(2 / 12) + 1 / 12 * math.log2(1 / 12) + 4 / 12 * math.log2(4 / 12))
    assert (u["tokens"], u["codes_used"], u["dead_codes"]) == (12, 4, 4)
    assert u["perplexity"] == pytest.approx(2**h) and u["entropy_bits"] == pytest.approx(h)
    assert u["top1pct_share"] == pytest.approx(5 / 12)
    assert rep["dead_code_ids"] == [4, 5, 6, 7]
    per = rep["shards"]["per_shard"]
    assert [p["samples"] for p in per] == [2, 1] and [p["tokens"] for p in per] == [8, 4]
    assert per[0]["drift_js_bits"] == pytest.approx(0.190874, abs=1e-5)  # worked out in test_codebook_stats
    assert rep["shards"]["drift_max_shard"] == "shard-000001.tar"
    cls = rep["classes"]
    assert [(c["name"], c["codes_used"], c["tokens"]) for c in cls["classes"]] == [("zero", 2, 4), ("one", 3, 8)]
    assert rep["geometry"] is None and "no --tokenizer" in rep["geometry_skipped"]
    # the mosaic: most used codes by count, then the least used live ones
    assert rep["mosaic"]["most_used"][:4] == [0, 3, 1, 2] and rep["mosaic"]["least_used"] == []

    files = {p.name for p in out.iterdir()}
    assert {"report.json", "codes.parquet", "report.html", "usage_sorted.png", "usage_histogram.png", "drift.png",
            "mosaic.png", "class_overlap.png"} <= files
    assert not [f for f in files if ".tmp-" in f]
    doc = json.loads((out / "report.json").read_text())
    assert doc["usage"] == pytest.approx(u) and set(doc["outputs"]) <= files
    assert doc["timing"]["seconds_per_million_tokens"] > 0
    codes = pq.read_table(out / "codes.parquet").to_pylist()
    assert [c["count"] for c in codes] == [5, 2, 1, 4, 0, 0, 0, 0]
    assert [c["rank"] for c in codes] == [1, 3, 4, 2, 5, 6, 7, 8]
    assert [c["dead"] for c in codes] == [False] * 4 + [True] * 4
    assert [c["shards_using"] for c in codes] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert [c["classes_using"] for c in codes] == [2, 1, 1, 1, 0, 0, 0, 0]
    assert codes[0]["frequency"] == pytest.approx(5 / 12) and codes[0]["nearest_code"] is None
    for name in files:
        if name.endswith(".png"):
            with Image.open(out / name) as im:
                im.verify()
    html = (out / "report.html").read_text()
    refs = _refs(html)
    assert sum(r.startswith("data:image/png;base64,") for r in refs) == 5
    for r in refs:
        assert r.startswith("data:") or (out / r).is_file(), r
    assert "perplexity" in html and "zero" in html
    printed = capsys.readouterr().out
    assert "used 4/8 (50.0%), dead 4" in printed and "report.html" in printed


def test_a_drifting_shard_is_flagged(tmp_path, ray_local):
    rng = np.random.default_rng(5)
    same = [[(rng.integers(0, 4, size=(1, 2, 2)).astype(np.uint16), None) for _ in range(25)] for _ in range(4)]
    odd = [[(rng.integers(4, 8, size=(1, 2, 2)).astype(np.uint16), None) for _ in range(25)]]
    cache = make_cache(tmp_path / "tokens", same + odd)
    rep = codebook_report(str(cache), str(tmp_path / "r"), sample=0, mosaic_codes=0, quiet=True)
    s = rep["shards"]
    assert s["drifting_shards"] == ["shard-000004.tar"] and s["drift_max_shard"] == "shard-000004.tar"
    per = s["per_shard"]
    # By hand: the odd shard (distribution o) is 1/5 of the tokens and disjoint from the rest (r), so the whole
    # is .8 r + .2 o and m = (o + whole) / 2 = .4 r + .6 o. KL(o||m) = log2(1/.6); KL(whole||m) = .8 log2(.8/.4)
    # + .2 log2(.2/.6). JS = the mean of the two, whatever the random counts inside o and r.
    expected = 0.5 * math.log2(1 / 0.6) + 0.5 * (0.8 * 1.0 + 0.2 * math.log2(1 / 3))
    assert per[4]["drift_js_bits"] == pytest.approx(expected) and expected == pytest.approx(0.6100, abs=1e-4)
    # the other shards lack the odd 20%: about .5 log2(1/.9) + .5 (.8 log2(.8/.9) + .2) = .108 each, not flagged
    assert all(0.08 < p["drift_js_bits"] < 0.14 for p in per[:4])
    assert not (tmp_path / "r" / "mosaic.png").exists()


def test_mosaic_patches_come_from_the_right_place(tmp_path, ray_local):
    # one image whose 4 quadrants are solid colours; code = quadrant index, so each code's patch is one colour
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for q, c in enumerate(colours):
        y, x = divmod(q, 2)
        img[y * 8 : (y + 1) * 8, x * 8 : (x + 1) * 8] = c
    cache = make_cache(tmp_path / "tokens", [[(T(0, 1, 2, 3), None), (T(0, 1, 2, 0), None)]], images=[img, img])
    from eval.codebook import report as R

    sc = R.Scan(1, VOCAB, 4)
    from eval.codebook.scan import scan_shard

    sc.add(0, scan_shard(str(cache / "shard-000000.tar"), VOCAB, 4))
    patches = R.run_mosaic(sc, [str(cache / "shard-000000.tar")], [0, 3], 16, (2, 2), quiet=True)
    assert len(patches[0]) == 2 and len(patches[3]) == 1  # code 0 occurs in both images, code 3 in one
    for code in (0, 3):
        for p in patches[code]:
            assert p.shape == (8, 8, 3) and np.abs(p.astype(int) - colours[code]).max() <= 2


def test_compare_two_reports(tmp_path, ray_local):
    a = make_cache(tmp_path / "a", SHARDS)
    b = make_cache(tmp_path / "b", [[(T(0, 1, 2, 3), None), (T(4, 5, 6, 7), None)]])  # same tokenizer id, every code once... twice
    codebook_report(str(a), str(tmp_path / "ra"), sample=0, quiet=True)
    rep = codebook_report(str(b), str(tmp_path / "rb"), compare=str(tmp_path / "ra" / "report.json"), sample=0, quiet=True)
    rows = {r["figure"]: r for r in rep["compare"]["rows"]}
    assert rows["codes used"]["this"] == 8 and rows["codes used"]["other"] == 4 and rows["codes used"]["change"] == "+4 (better)"
    assert rows["dead codes"]["change"] == "-4 (better)"
    assert rows["perplexity"]["this"] == pytest.approx(8.0)
    assert rep["compare"]["dead_here_only"] == 0 and rep["compare"]["dead_there_only"] == 4
    assert 0 < rep["compare"]["histogram_js"] < 1
    assert (tmp_path / "rb" / "compare_usage.png").is_file()
    html = (tmp_path / "rb" / "report.html").read_text()
    assert "Compared with" in html and "compare_usage" not in "".join(r for r in _refs(html) if not r.startswith("data:"))
    # a directory works too, and a missing report is a clear error
    assert codebook_report(str(b), str(tmp_path / "rc"), compare=str(tmp_path / "ra"), sample=0, quiet=True)["compare"]
    with pytest.raises(StageError, match="no report"):
        codebook_report(str(b), str(tmp_path / "rd"), compare=str(tmp_path / "nowhere"), sample=0, quiet=True)


def test_bad_caches_are_clear_errors(tmp_path, ray_local, capsys):
    no_manifest = make_cache(tmp_path / "x", SHARDS, manifest=False)
    with pytest.raises(CacheError, match="no manifest.parquet"):
        codebook_report(str(no_manifest), str(tmp_path / "o1"), quiet=True)
    empty = make_cache(tmp_path / "y", [])
    with pytest.raises(CacheError, match="empty"):
        codebook_report(str(empty), str(tmp_path / "o2"), quiet=True)
    no_tokens = make_cache(tmp_path / "z", [[(np.zeros((0, 2, 2), np.uint16), None)]])
    with pytest.raises(CacheError, match="holds no tokens"):
        codebook_report(str(no_tokens), str(tmp_path / "o3"), quiet=True)
    too_big = make_cache(tmp_path / "w", [[(T(0, 1, 9, 2), None)]])
    with pytest.raises(CacheError, match="vocabulary size 8"):
        codebook_report(str(too_big), str(tmp_path / "o4"), quiet=True)
    with pytest.raises(CacheError, match="not found"):
        codebook_report(str(tmp_path / "missing"), str(tmp_path / "o5"), quiet=True)
    # the CLI: one line, exit code 2
    assert main(["codebook", "report", "--tokens", str(no_manifest), "--out", str(tmp_path / "o6")]) == 2
    err = capsys.readouterr().err
    assert "mimflow codebook: error:" in err and "manifest.parquet" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists()


def test_cli_writes_the_report_and_finds_the_cache_in_its_parent(tmp_path, ray_local, capsys):
    make_cache(tmp_path / "tokens", SHARDS)
    assert main(["codebook", "report", "--tokens", str(tmp_path / "tokens"), "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["cache"]["tokenizer_id"] == "tok0001"
    assert "perplexity" in capsys.readouterr().out


def test_helpers():
    counts = np.array([5, 0, 1, 1, 9, 2])
    most, least = choose_mosaic_codes(counts, 2)
    assert most == [4, 0] and least == [2, 3]
    rows = [{"samples": 10}] * 20
    picks = pick_agreement_shards(rows, 32)
    assert sum(t for _, t in picks) == 32 and picks[0][0] == 0 and len(picks) == 8
    assert pick_agreement_shards([{"samples": 3}], 100) == [(0, 3)]


def test_scan_shard_equals_per_sample_counting(tmp_path):
    from eval.codebook.scan import scan_shard

    rng = np.random.default_rng(9)
    samples = [(rng.integers(0, 50, size=(2, 3, 3)).astype(np.uint16), None if i % 4 == 0 else int(rng.integers(0, 5)))
               for i in range(30)]
    cache = make_cache(tmp_path / "t", [samples], vocab=50)
    r = scan_shard(str(cache / "shard-000000.tar"), 50, occurrences=3)
    assert (r["samples"], r["views"], r["tokens"], r["out_of_range"], r["grids"]) == (30, 60, 540, 0, [(3, 3)])
    assert np.array_equal(r["counts"], sum(np.bincount(t.ravel(), minlength=50) for t, _ in samples))
    for label in range(5):
        want = sum((np.bincount(t.ravel(), minlength=50) for t, lab in samples if lab == label), np.zeros(50, np.int64))
        codes, counts = r["labels"].get(label, (np.zeros(0, int), np.zeros(0, int)))
        got = np.zeros(50, np.int64)
        got[codes] = counts
        assert np.array_equal(got, want)
    assert len(r["occ"]) == sum(min(3, sum(1 for t, _ in samples if (t == c).any())) for c in range(50))
