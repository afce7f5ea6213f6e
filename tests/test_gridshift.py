"""Grid-shift arithmetic: keyed offsets that are multiples of k; disjoint patches covering the canvas."""

import numpy as np
import pytest

from wsigen.method import gridshift
from wsigen.method.gridshift import Patch


@pytest.mark.parametrize("patch,k", [(64, 2), (512, 2), (48, 3), (32, 4)])
def test_offsets_are_keyed_multiples_of_k(patch, k):
    seen = set()
    for step in range(400):
        oy, ox = gridshift.grid_offset(7, 3, step, patch, k)
        assert oy % k == 0 and ox % k == 0 and 0 <= oy < patch and 0 <= ox < patch
        assert (oy, ox) == gridshift.grid_offset(7, 3, step, patch, k)  # keyed, no hidden stream
        seen.update((oy, ox))
    assert len(seen) > 0.9 * min(patch // k, 400)  # spread over [0, M)
    assert gridshift.grid_offset(7, 3, 0, patch, k, shift=False) == (0, 0)


def test_offsets_depend_on_seed_stage_and_step():
    a = [gridshift.grid_offset(1, 1, i, 512, 2) for i in range(20)]
    assert a != [gridshift.grid_offset(2, 1, i, 512, 2) for i in range(20)]
    assert a != [gridshift.grid_offset(1, 2, i, 512, 2) for i in range(20)]


def test_patch_not_multiple_of_k_refused():
    with pytest.raises(ValueError):
        gridshift.grid_offset(0, 0, 0, 63, 2)


@pytest.mark.parametrize("seed", range(25))
def test_patches_are_disjoint_and_cover_the_canvas(seed):
    rng = np.random.default_rng(seed)
    m, k = int(rng.choice([8, 16, 32])), 2
    h, w = (int(v) for v in rng.integers(1, 5 * m, size=2) * k)
    oy, ox = gridshift.grid_offset(seed, 1, 0, m, k)
    rows, cols = gridshift.rows_and_cols(h, w, oy, ox, m)
    cover = np.zeros((h, w), dtype=int)
    for y0 in rows:
        for x0 in cols:
            ya, yb, xa, xb = Patch(y0, x0, m).valid(h, w)
            assert ya < yb and xa < xb  # every listed patch meets the canvas
            cover[ya:yb, xa:xb] += 1
    assert (cover == 1).all()


def test_shifted_side_has_one_more_patch():
    assert len(gridshift.axis_starts(1024, 0, 256)) == 4
    assert len(gridshift.axis_starts(1024, 128, 256)) == 5
    assert gridshift.axis_starts(1024, 128, 256)[0] == -128


def test_split_even_is_contiguous_and_balanced():
    for n in range(0, 20):
        for parts in range(1, 6):
            s = gridshift.split_even(n, parts)
            assert s[0][0] == 0 and s[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(s, s[1:], strict=False))
            sizes = [b - a for a, b in s]
            assert max(sizes) - min(sizes) <= 1


def test_batches_keep_row_order():
    assert list(gridshift.batches([0, 1, 2, 3, 4], 2)) == [[0, 1], [2, 3], [4]]
