from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pipeline.views import centre_view, make_views, render_view, views_from_json, views_to_json


def test_centre_view_is_the_centred_square():
    assert centre_view(100, 60).box == (20, 0, 80, 60)
    assert make_views("k", 100, 60, 1) == [centre_view(100, 60)]


def test_random_views_are_seeded_by_key_and_inside_the_image():
    a = make_views("sample-1", 120, 80, 8, seed=0)
    assert a == make_views("sample-1", 120, 80, 8, seed=0)
    assert a != make_views("sample-2", 120, 80, 8, seed=0)
    assert a != make_views("sample-1", 120, 80, 8, seed=1)
    for v in a:
        x0, y0, x1, y1 = v.box
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 80
        assert 0.3 * 120 * 80 <= (x1 - x0) * (y1 - y0) <= 120 * 80
    flips = [v.flip for k in range(20) for v in make_views(f"k{k}", 64, 64, 4)]
    assert 0.25 < np.mean(flips) < 0.75


def test_json_round_trip_and_render():
    views = make_views("x", 50, 40, 3)
    assert views_from_json(views_to_json(50, 40, views)) == (50, 40, views)
    img = Image.fromarray(np.arange(50 * 40 * 3, dtype=np.uint8).reshape(40, 50, 3))
    out = render_view(img, views[0], 16)
    assert out.size == (16, 16)
    flipped = render_view(img, type(views[0])(views[0].box, not views[0].flip), 16)
    assert np.array_equal(np.asarray(out)[:, ::-1], np.asarray(flipped))


# --- the papers' views: colour jitter and each side's interpolation ----------------------------------------
from PIL import ImageEnhance  # noqa: E402

from pipeline.token_cache import CACHE_FORMAT, CacheError, CacheInfo  # noqa: E402
from pipeline.views import View, ViewStyle  # noqa: E402

BEIT = ViewStyle(scale=(0.08, 1.0), jitter=0.4, interp="bicubic", tok_interp="lanczos")


def _image(w: int = 60, h: int = 44) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1) % 256
    return Image.fromarray((base * 0.7 + rng.integers(0, 60, (h, w, 3))).astype(np.uint8))


def test_jitter_factors_and_order_are_drawn_per_view_and_survive_json():
    views = make_views("k", 60, 44, 12, seed=3, style=BEIT)
    assert views == make_views("k", 60, 44, 12, seed=3, style=BEIT)
    for v in views:
        assert sorted(op for op, _ in v.jitter) == ["brightness", "contrast", "saturation"]
        assert all(0.6 <= f <= 1.4 for _, f in v.jitter)
        assert (v.interp, v.tok_interp) == ("bicubic", "lanczos")
    assert len({tuple(op for op, _ in v.jitter) for v in views}) > 1  # the order varies
    assert len({v.jitter[0][1] for v in views}) == len(views)  # so do the factors
    assert views_from_json(views_to_json(60, 44, views)) == (60, 44, views)
    # no jitter configured: no jitter drawn, and the crops are the ones drawn before jitter existed
    plain = make_views("k", 60, 44, 12, seed=3, style=ViewStyle(scale=(0.08, 1.0)))
    assert all(v.jitter == () for v in plain)


def test_render_jitters_the_whole_image_in_order_then_crops_with_each_sides_filter():
    img = _image()
    view = make_views("k", 60, 44, 4, seed=1, style=BEIT)[1]
    # the reference: torchvision's ColorJitter on a PIL image (ImageEnhance, in the drawn order, on the
    # whole image, so contrast pivots on the whole image's grey mean), then crop + resize + flip
    ref = img
    for op, f in view.jitter:
        ref = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
               "saturation": ImageEnhance.Color}[op](ref).enhance(f)
    for side, size, resample in (("image", 24, Image.Resampling.BICUBIC), ("tokenizer", 12, Image.Resampling.LANCZOS)):
        want = ref.crop(view.box).resize((size, size), resample)
        if view.flip:
            want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        got = render_view(img, view, size, side)
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert np.array_equal(np.asarray(got), np.asarray(render_view(img, view, size, side)))  # deterministic
        plain = render_view(img, View(view.box, view.flip, (), view.interp, view.tok_interp), size, side)
        assert np.abs(np.asarray(got, np.int16) - np.asarray(plain, np.int16)).mean() > 2  # jitter shows
    # lanczos and bicubic differ on the tokenizer side: the filter is the view's, not a constant
    bicubic = render_view(img, View(view.box, view.flip, view.jitter, "bicubic", "bicubic"), 12, "tokenizer")
    assert not np.array_equal(np.asarray(bicubic), np.asarray(render_view(img, view, 12, "tokenizer")))


def test_the_identity_view_stays_exactly_the_image_whatever_the_style():
    img = _image(32, 32)
    (view,) = make_views("k", 32, 32, 1, style=BEIT)
    assert view == View((0, 0, 32, 32), False, (), "bicubic", "lanczos")
    for side in ("image", "tokenizer"):
        assert np.array_equal(np.asarray(render_view(img, view, 32, side)), np.asarray(img))


def test_views_json_of_an_old_cache_reads_as_no_jitter_and_bad_fields_are_one_line():
    old = b'{"size":[50,40],"views":[{"box":[0,0,40,40],"flip":true}]}'
    assert views_from_json(old) == (50, 40, [View((0, 0, 40, 40), True, (), "bicubic", "bicubic")])
    # views without jitter and with the default filters are written as before
    assert views_to_json(50, 40, [View((0, 0, 40, 40), True)]) == old
    bad = b'{"size":[50,40],"views":[{"box":[0,0,40,40],"flip":true,"tok_interp":"sinc"}]}'
    with pytest.raises(ValueError, match="unknown jitter op or interpolation 'sinc'"):
        views_from_json(bad)


def test_view_style_key_round_trips_and_bad_values_name_the_field():
    assert ViewStyle().key() == "" and ViewStyle.parse("") == ViewStyle()
    assert ViewStyle.parse(BEIT.key()) == BEIT
    with pytest.raises(ValueError, match="tok_interp 'sinc'"):
        ViewStyle(tok_interp="sinc")
    with pytest.raises(ValueError, match="crop scale"):
        ViewStyle(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="jitter strength"):
        ViewStyle(jitter=1.5)


def test_cache_info_without_a_view_style_is_an_old_cache_with_the_default_style():
    info = CacheInfo(format=CACHE_FORMAT, tokenizer_id="t", tokenizer_dir="d", kind="vqkd", vocab_size=8, grid=[2, 2],
                     input_size=16, views=1, seed=0, source="s", source_kind="folder", source_fingerprint="f",
                     source_size=1, partitions=1, partition_size=1, shards=1, samples=1, errors=0,
                     errors_file="e", classes=None, created="now", shard_bytes=10, image_bytes=3,
                     bytes_per_sample=10.0, view_style=BEIT.key())
    assert CacheInfo.from_json(info.to_json(), "m") == info
    doc = json.loads(info.to_json())
    del doc["view_style"]
    assert CacheInfo.from_json(json.dumps(doc), "m").view_style == ""
    del doc["seed"]
    with pytest.raises(CacheError, match="missing \\['seed'\\]"):
        CacheInfo.from_json(json.dumps(doc), "m")


def test_a_finished_shard_is_kept_only_for_the_same_view_style(tmp_path):
    from pipeline.sources import Sample
    from pipeline.token_cache import file_sha256
    from tokenizer.cache_records import BuildParams, partition_digest, shard_current

    (tmp_path / "shard-000000.tar").write_bytes(b"x" * 10)
    params = BuildParams(tokenizer_dir="t", tokenizer_id="id", source_spec="s", source_fingerprint="f",
                         cache_dir=str(tmp_path), views=4, seed=0, batch_size=8, partitions=1)
    beit = replace(params, style=BEIT)
    items = [Sample("k", b"img", "png", None, "o")]
    # a record written before view styles existed (no view_style key) is of the default style
    rec = {"format": CACHE_FORMAT, "tokenizer_id": "id", "views": 4, "seed": 0, "partitions": 1, "source_fingerprint": "f",
           "shard": "shard-000000.tar", "sha256": file_sha256(str(tmp_path / "shard-000000.tar")),
           "digest": partition_digest(items, params, 16)}
    assert shard_current(rec, params) and shard_current(rec, params, rec["digest"])
    assert not shard_current(rec, beit)
    assert partition_digest(items, beit, 16) != rec["digest"]
    assert shard_current({**rec, "view_style": BEIT.key(), "digest": partition_digest(items, beit, 16)}, beit,
                         partition_digest(items, beit, 16))


def test_pretraining_notes_a_recipe_style_the_cache_was_not_built_with():
    from pipeline.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.plan import style_note

    beit = load_config(PretrainConfig, "beit_base_patch16_224", [])
    beit_style = beit.data.view_style().key()
    assert style_note(beit, 4, beit_style) is None  # built as the recipe says
    note = style_note(beit, 4, "")  # a cache with default views under BEiT's recipe
    assert note is not None and "crop scale 0.4..1, jitter 0" in note and "crop scale 0.08..1, jitter 0.4" in note
    # one view per image: only the resampling comes from the style
    assert style_note(beit, 1, beit_style.replace("jitter=0.4", "jitter=0")) is None
    assert "lanczos (tokenizer)" in style_note(beit, 1, "")
    # fresh views: the cache's are not trained on, nothing to say
    fresh = load_config(PretrainConfig, "beit_base_patch16_224", ["data.augment=random_resized_crop", "target=pixels"])
    assert style_note(fresh, 4, "") is None
