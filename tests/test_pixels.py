"""The fast area resize and RGB conversion agree with the earlier exact implementations.

``_old_area_resize`` / ``_old_over`` are verbatim copies of the float64 integral-image resize and
the float alpha blend that ``wsigen.slides.pixels`` used before issue 13; the new code must stay
within one grey level of them on random images, boxes and scales (and be exact on closed forms).
"""

from __future__ import annotations

import numpy as np
import pytest

from wsigen.slides import pixels


def _old_area_resize(a, box, out_w, out_h):
    x0, y0, x1, y1 = box
    h, w = a.shape[:2]
    s = np.zeros((h + 1, w + 1, a.shape[2]), np.float64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.float64), axis=1, out=s[1:, 1:])

    def interp(s, edges, axis):
        n = s.shape[axis] - 1
        edges = np.clip(edges, 0, n)
        i = np.minimum(np.floor(edges).astype(np.int64), n - 1)
        f = (edges - i).reshape([-1 if d == axis else 1 for d in range(s.ndim)])
        return np.take(s, i, axis=axis) * (1 - f) + np.take(s, i + 1, axis=axis) * f

    s = interp(s, np.linspace(y0, y1, out_h + 1), 0)
    s = interp(s, np.linspace(x0, x1, out_w + 1), 1)
    sums = s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]
    area = ((y1 - y0) / out_h) * ((x1 - x0) / out_w)
    return np.clip(np.rint(sums / area), 0, 255).astype(np.uint8)


def _old_over(a, background):
    c = a.shape[2]
    alpha = a[:, :, -1:].astype(np.float32) / 255
    rgb = a[:, :, :-1].astype(np.float32)
    bg = (np.asarray(background, np.float32)[: rgb.shape[2]] if c == 4
          else np.float32(np.mean(background)))
    out = np.rint(rgb * alpha + bg * (1 - alpha)).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def _image(rng, h, w, smooth):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if smooth:  # blocks of constant colour: sharp edges, where fractional weights matter most
        k = int(rng.integers(2, 9))
        small = rng.integers(0, 256, (-(-h // k), -(-w // k), 3), dtype=np.uint8)
        a = np.ascontiguousarray(np.repeat(np.repeat(small, k, 0), k, 1)[:h, :w])
    return a


@pytest.mark.parametrize("seed", range(4))
def test_area_resize_within_one_level_of_old_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    worst = 0
    for t in range(60):
        h, w = (int(v) for v in rng.integers(1, 260, 2))
        a = _image(rng, h, w, smooth=t % 2 == 0)
        x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        x1, y1 = rng.uniform(x0 + 0.05, w), rng.uniform(y0 + 0.05, h)
        # reductions (the training case), about 1:1 and enlargements
        scale = float(rng.choice([0.05, 0.3, 0.9, 1.0, 1.7, 4.0]))
        ow = max(1, round((x1 - x0) * scale))
        oh = max(1, round((y1 - y0) * scale))
        want = _old_area_resize(a, (x0, y0, x1, y1), ow, oh).astype(int)
        got = pixels.area_resize(a, (x0, y0, x1, y1), ow, oh)
        assert got.dtype == np.uint8 and got.shape == (oh, ow, 3)
        worst = max(worst, int(np.abs(got.astype(int) - want).max()))
    assert worst <= 1


def test_area_resize_large_reduction_uses_exact_sums():
    # a 64× and a 300× reduction (float64 path) of random pixels, against the old float64 code
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (1200, 900, 3), dtype=np.uint8)
    for out in ((14, 18), (3, 4)):
        box = (0.5, 0.25, 899.5, 1199.0)
        want = _old_area_resize(a, box, *out).astype(int)
        assert np.abs(pixels.area_resize(a, box, *out).astype(int) - want).max() <= 1


def test_area_resize_closed_forms():
    # a k×k integer reduction is the block mean; a constant stays constant on any box
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    mean = a.reshape(12, 4, 10, 4, 3).astype(np.float64).mean(axis=(1, 3))
    got = pixels.area_resize(a, (0, 0, 40, 48), 10, 12)
    assert np.abs(got - mean).max() <= 0.5 + 1e-6
    c = np.full((9, 11, 3), 201, np.uint8)
    assert (pixels.area_resize(c, (0.37, 1.2, 10.9, 8.01), 7, 3) == 201).all()
    # half a pixel of a black/white edge averages to grey 128 (127.5 rounds to even: 128)
    e = np.zeros((2, 2, 3), np.uint8)
    e[:, 1] = 255
    assert (pixels.area_resize(e, (0.5, 0, 1.5, 2), 1, 1) == 128).all()


@pytest.mark.parametrize("channels", [2, 4])
def test_alpha_blend_within_one_level_of_old(channels):
    rng = np.random.default_rng(channels)
    a = rng.integers(0, 256, (50, 60, channels), dtype=np.uint8)
    a[:10, :, -1] = 255
    a[10:20, :, -1] = 0
    for bg in ((255, 255, 255), (242, 240, 244), (13, 200, 77)):
        got = pixels.to_rgb8(a, bg).astype(int)
        assert np.abs(got - _old_over(a, bg)).max() <= 1
        assert (got[10:20] == np.asarray(bg if channels == 4 else [round(np.mean(bg))] * 3)).all()


def test_opaque_rgba_is_the_colour_exactly():
    a = np.random.default_rng(5).integers(0, 256, (7, 9, 4), dtype=np.uint8)
    a[..., 3] = 255
    got = pixels.to_rgb8(a)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, a[..., :3])


@pytest.mark.parametrize("kind", ["rgb-jpeg", "rgb-deflate", "grey", "rgba"])
def test_direct_tile_reads_equal_zarr(tmp_path, kind):
    import tifffile

    from wsigen.slides import readers

    rng = np.random.default_rng(11)
    shape = {"grey": (333, 290), "rgba": (333, 290, 4)}.get(kind, (333, 290, 3))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    p = tmp_path / "t.tif"
    comp = "jpeg" if kind == "rgb-jpeg" else "zlib"
    tifffile.imwrite(p, img, tile=(64, 48), compression=comp,
                     photometric="minisblack" if kind == "grey" else "rgb",
                     extrasamples=[2] if kind == "rgba" else None,
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    with readers.open_image(p) as s:
        assert s._tiles[0] is not None  # the direct path is taken
        arr, _ = s._arrays[0]
        for _ in range(20):
            w, h = (int(v) for v in rng.integers(1, 200, 2))
            x, y = int(rng.integers(0, 290 - w + 1)), int(rng.integers(0, 333 - h + 1))
            want = readers.to_rgb8(np.asarray(arr[y : y + h, x : x + w]).reshape(h, w, -1))
            np.testing.assert_array_equal(s.read_region(x, y, w, h), want)
