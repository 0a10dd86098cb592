from __future__ import annotations

import numpy as np
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
