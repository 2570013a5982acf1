"""megasail.data.images.tiling against InternVL's reference grid choice (tests/internvl_reference.py)."""

from __future__ import annotations

import itertools
import random

import internvl_reference as ref  # tests/ is on sys.path (tests/conftest.py)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from megasail.data.images.tiling import candidate_grids, num_image_tokens, num_tiles, tile_grid


def reference_grid(width, height, max_tiles, min_tiles=1, tile_size=448):
    ratios = ref.target_ratios_for(min_tiles, max_tiles)
    return ref.find_closest_aspect_ratio(width / height, ratios, width, height, tile_size)


# Sides that hit the interesting cases: 1 px, smaller than a tile, around one tile, around the
# square tie thresholds (s*s vs 0.5*448^2*k^2: 633/634 for 2x2, 950/951 for 3x3), photos, A4 scans, huge.
SIDES = [1, 2, 7, 100, 300, 447, 448, 449, 500, 633, 634, 640, 672, 896, 950, 951, 1000, 1344, 2480, 3508, 10000]
MAX_TILES = [1, 2, 4, 6, 10, 12, 24]


def sweep_cases():
    cases = [(w, h, m, 1) for w, h, m in itertools.product(SIDES, SIDES, MAX_TILES)]
    # Aspect ratios exactly between two grids (1.5 between 1:1 and 2:1 at max 4), on both sides of the
    # area threshold, and min_tiles > 1.
    for k in range(1, 400, 7):
        cases += [(3 * k, 2 * k, 4, 1), (2 * k, 3 * k, 4, 1), (5 * k, 2 * k, 6, 2), (k, k, 12, 4)]
    rng = random.Random(0)
    for _ in range(500):
        w, h = (int(10 ** rng.uniform(0, 4.3)) or 1 for _ in range(2))
        max_tiles = rng.randint(1, 40)
        cases.append((w, h, max_tiles, rng.randint(1, max_tiles)))
    return cases


def test_grid_matches_internvl_on_sweep():
    cases = sweep_cases()
    assert len(cases) >= 1000
    mismatches = [(c, tile_grid(*c[:3], min_tiles=c[3]), reference_grid(*c)) for c in cases
                  if tile_grid(*c[:3], min_tiles=c[3]) != reference_grid(*c)]
    assert not mismatches, mismatches[:10]


def test_grid_matches_internvl_for_other_tile_sizes():
    """The area tie-break scales with the tile size; smaller tiles move the thresholds."""
    rng = random.Random(2)
    for _ in range(400):
        tile_size = rng.choice([14, 28, 224, 336, 512])
        w, h, max_tiles = rng.randint(1, 3000), rng.randint(1, 3000), rng.randint(1, 16)
        assert tile_grid(w, h, max_tiles, tile_size=tile_size) == reference_grid(w, h, max_tiles, 1, tile_size)
    for side in range(1, 80):  # square images: every (k, k) grid ties, the area decides
        assert tile_grid(side, side, 12, tile_size=14) == reference_grid(side, side, 12, 1, 14)


@pytest.mark.parametrize(("width", "height", "max_tiles", "expected"), [
    (1, 10000, 12, (1, 12)),  # extreme portrait: the tallest grid
    (10000, 1, 12, (12, 1)),
    (1, 1, 12, (1, 1)),  # tiny square: the tie to 2x2/3x3 is lost on area
    (1000, 1000, 12, (3, 3)),  # square ties go to the larger grid when the image is big enough
    (633, 633, 12, (1, 1)),
    (634, 634, 12, (2, 2)),
    (2480, 3508, 12, (2, 3)),  # A4: 2/3 is closer to 1/sqrt(2) than 3/4
    (640, 480, 6, (3, 2)),
])
def test_grid_known_values(width, height, max_tiles, expected):
    assert tile_grid(width, height, max_tiles) == expected
    assert reference_grid(width, height, max_tiles) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(1, 30), st.data())
def test_grid_matches_internvl_property(width, height, max_tiles, data):
    min_tiles = data.draw(st.integers(1, max_tiles))
    assert tile_grid(width, height, max_tiles, min_tiles) == reference_grid(width, height, max_tiles, min_tiles)


def test_candidate_grids_order_is_internvl_order():
    for min_tiles, max_tiles in [(1, 1), (1, 6), (1, 12), (2, 9), (1, 40)]:
        assert list(candidate_grids(min_tiles, max_tiles)) == ref.target_ratios_for(min_tiles, max_tiles)


def test_tile_count_matches_reference_dynamic_preprocess():
    """num_tiles counts what InternVL's dynamic_preprocess emits; a tiny tile size keeps resizes cheap."""
    tile_size = 4
    rng = random.Random(1)
    for _ in range(150):
        w, h = rng.randint(1, 60), rng.randint(1, 60)
        max_tiles = rng.randint(1, 12)
        tiles = ref.dynamic_preprocess(Image.new("RGB", (w, h)), max_num=max_tiles, image_size=tile_size,
                                       use_thumbnail=True)
        assert num_tiles(w, h, max_tiles, tile_size=tile_size) == len(tiles), (w, h, max_tiles)
        assert all(t.size == (tile_size, tile_size) for t in tiles)


def test_num_image_tokens():
    assert num_image_tokens(448, 448, 12) == 256 + 2  # one tile, no thumbnail, <img></img>
    assert num_image_tokens(2480, 3508, 12) == (6 + 1) * 256 + 2  # 2x3 grid + thumbnail
    assert num_image_tokens(2480, 3508, 12, include_wrapper=False) == 7 * 256
    assert num_image_tokens(2480, 3508, 12, use_thumbnail=False) == 6 * 256 + 2


@pytest.mark.parametrize(("args", "match"), [((0, 10, 4), "positive"), ((10, 10, 0), "min_tiles"),
                                             ((10, 10, 2, 3), "min_tiles")])
def test_invalid_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        tile_grid(*args)
