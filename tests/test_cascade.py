"""The coarse-to-fine cascade: stage planning, projection guidance, padding, determinism."""

import numpy as np
import pytest
import torch

from wsigen import api
from wsigen.method.canvas import Band, GuideBand, from_uint8, to_uint8
from wsigen.method.cascade import _Segment, diffuse, initial_band
from wsigen.method.gridshift import Patch
from wsigen.method.guidance import avgpool
from wsigen.method.stages import Settings, StageContext, plan_stages
from wsigen.nets import GaussianDenoiser
from wsigen.slides.checkpoint import load_model
from wsigen.slides.store import SlideStore


def test_plan_65536_matches_paper():
    plans = plan_stages(65536, 65536, 512, 2, 0.5)
    assert len(plans) - 1 == 7
    assert plans[0].mpp == 0.5 * 2**7 and plans[-1].mpp == 0.5
    assert [p.height for p in plans] == [512 * 2**l for l in range(8)]


@pytest.mark.parametrize("w,h,m", [(1000, 300, 64), (64, 64, 64), (65, 7, 64), (4097, 2049, 512), (30, 30, 64)])
def test_plan_non_square_computes_only_what_is_needed(w, h, m):
    k = 2
    plans = plan_stages(w, h, m, k, 1.0)
    L = len(plans) - 1
    assert m * k**L >= max(w, h) and (L == 0 or m * k ** (L - 1) < max(w, h))
    last = plans[-1]
    assert h <= last.height < h + k and w <= last.width < w + k
    assert plans[0].height <= m and plans[0].width <= m
    for prev, cur in zip(plans, plans[1:], strict=False):
        assert cur.height % k == 0 and cur.width % k == 0
        assert cur.height // k <= prev.height and cur.width // k <= prev.width  # guide exists
        assert cur.height // k > prev.height - k  # and no more than a rounding is computed
        assert cur.mpp * k == pytest.approx(prev.mpp)


def _stage_ctx(model, r, steps=6, h=96, w=64, patch=32, seed=0, batch=4):
    s = Settings(steps=steps, guided_steps=r, batch=batch)
    return StageContext(model, s, seed=seed, stage=1, height=h, width=w, mpp=2.0, patch=patch, k=2,
                        background=(0.9, 0.88, 0.91), device=torch.device("cpu"))


def _guide(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return GuideBand(0, h // 2, rng.integers(30, 230, size=(3, h // 2, w // 2), dtype=np.uint8))


@pytest.fixture(params=["gaussian", "unet"])
def denoiser(request, tiny_model):
    if request.param == "gaussian":
        return GaussianDenoiser()
    return load_model(tiny_model).denoiser


def test_full_projection_makes_output_pool_to_guide(denoiser):
    ctx = _stage_ctx(denoiser, r=6)
    guide = _guide(ctx.height, ctx.width)
    out = diffuse(ctx, initial_band(ctx, 0, ctx.height), guide).data
    pooled = avgpool(out[None], 2)[0]
    assert torch.allclose(pooled, from_uint8(guide.data), atol=2e-5)


def test_no_projection_ignores_guide(denoiser):
    ctx = _stage_ctx(denoiser, r=0)
    guide = _guide(ctx.height, ctx.width)
    out = diffuse(ctx, initial_band(ctx, 0, ctx.height), guide).data
    assert (avgpool(out[None], 2)[0] - from_uint8(guide.data)).abs().mean() > 0.05


@pytest.mark.parametrize("y0,xs", [(-8, [-16, 16]), (24, [-16, 16]), (16, [16]), (-8, [0])])
def test_padding_is_not_state(y0, xs):
    # Scatter writes only the valid region; padded pixels (made NaN here) never reach the state.
    ctx = _stage_ctx(GaussianDenoiser(), r=0, h=40, w=40)
    band = Band(40, 40, 0, 40, torch.zeros(3, 40, 40))
    seg = _Segment(ctx, 0, y0, xs, band, None)
    x = seg.gather(1.0)
    assert seg.mask is not None and (~seg.mask).any()
    x = torch.where(seg.mask, x + 1, torch.full_like(x, float("nan")))
    seg.scatter(x)
    assert torch.isfinite(band.data).all()
    assert band.data.shape == (3, 40, 40)
    for x0 in xs:
        ya, yb, xa, xb = Patch(y0, x0, 32).valid(40, 40)
        assert (band.data[:, ya:yb, xa:xb] == 1).all()
    assert (band.data == 1).sum() == 3 * sum(
        (lambda v: (v[1] - v[0]) * (v[3] - v[2]))(Patch(y0, x0, 32).valid(40, 40)) for x0 in xs)
    # Padding pixels at noise level t are b + t·ε.
    x2 = seg.gather(2.0)
    pad = ~seg.mask.expand_as(x2)
    assert torch.allclose(x2[pad], (seg.bg + 2.0 * seg.eps).expand_as(x2)[pad])


def test_gather_scatter_round_trip():
    ctx = _stage_ctx(GaussianDenoiser(), r=0, h=64, w=96)
    data = torch.randn(3, 64, 96)
    band = Band(64, 96, 0, 64, data.clone())
    seg = _Segment(ctx, 0, 32, [0, 32, 64], band, None)
    x = seg.gather(1.0)
    assert seg.mask is None and torch.equal(x[1], data[:, 32:64, 32:64])
    seg.scatter(x * 0 + 5)
    assert (band.data[:, 32:64] == 5).all() and torch.equal(band.data[:, :32], data[:, :32])


def test_pixelwise_model_ignores_padding_values():
    outs = []
    for bg in [(0.9, 0.9, 0.9), (-0.5, 0.2, 0.0)]:
        ctx = _stage_ctx(GaussianDenoiser(), r=3, h=40, w=72)
        ctx.background = bg
        outs.append(diffuse(ctx, initial_band(ctx, 0, 40), _guide(40, 72)).data)
    assert torch.equal(outs[0], outs[1])


def test_same_key_same_bytes_in_any_patch_order(tiny_model):
    model = load_model(tiny_model).denoiser
    runs = []
    for order in (None, lambda rows: rows[::-1], lambda rows: rows[1::2] + rows[0::2]):
        ctx = _stage_ctx(model, r=4, h=96, w=96)
        runs.append(diffuse(ctx, initial_band(ctx, 0, 96), _guide(96, 96), pick_rows=order).data)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    ctx = _stage_ctx(model, r=4, h=96, w=96, seed=1)
    other = diffuse(ctx, initial_band(ctx, 0, 96), _guide(96, 96)).data
    assert not torch.equal(runs[0], other)


def test_grid_shift_changes_patch_boundaries(tiny_model):
    model = load_model(tiny_model).denoiser
    ctx = _stage_ctx(model, r=4)
    offsets = {ctx.offsets(i) for i in range(ctx.settings.steps)}
    assert len(offsets) > 1
    ctx.shift = False
    assert {ctx.offsets(i) for i in range(6)} == {(0, 0)}


def test_sample_stages_pool_to_previous_stage(tmp_path, tiny_model):
    s = api.sample(tmp_path / "s.zarr", 200, model=str(tiny_model), steps=12, guided_steps=12, seed=2,
                   device="cpu")
    assert s["L"] == 3 and s["width"] == 200
    store = SlideStore.open(tmp_path / "s.zarr")
    for l in range(1, 4):
        cur = store.read_rows(l, 0, store.stages[l]["height"]).astype(np.float64)
        prev = store.read_rows(l - 1, 0, store.stages[l - 1]["height"]).astype(np.float64)
        h2, w2 = cur.shape[1] // 2 * 2, cur.shape[2] // 2 * 2
        blocks = cur[:, :h2, :w2].reshape(3, h2 // 2, 2, w2 // 2, 2)
        pooled = blocks.mean(axis=(2, 4))
        ref = prev[:, : h2 // 2, : w2 // 2]
        # Clipping to [0, 255] at the fine level breaks the equality; compare unclipped blocks.
        inside = (blocks.min(axis=(2, 4)) > 0) & (blocks.max(axis=(2, 4)) < 255)
        assert inside.mean() > 0.3
        assert np.abs(pooled - ref)[inside].max() <= 0.5 + 1e-6  # uint8 rounding only


def test_sample_unguided_stage_ignores_previous(tmp_path, tiny_model):
    api.sample(tmp_path / "s.zarr", 128, model=str(tiny_model), steps=4, guided_steps=0, device="cpu")
    store = SlideStore.open(tmp_path / "s.zarr")
    cur = store.read_rows(2, 0, 128).astype(np.float64)
    prev = store.read_rows(1, 0, 64).astype(np.float64)
    pooled = cur.reshape(3, 64, 2, 64, 2).mean(axis=(2, 4))
    assert np.abs(pooled - prev).mean() > 5


def test_uint8_conversion_is_one_function():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, -0.99])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 1]
    u = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(u)), u)


@pytest.mark.parametrize("n,batch,patch", [(33, 8, 64), (200, 8, 64), (129, 8, 64), (17, 8, 512), (3, 8, 512),
                                           (1, 1, 32), (257, 5, 64), (64, 64, 64)])
def test_row_segments_are_whole_batches_that_cover_the_row(n, batch, patch):
    from wsigen.method.cascade import row_segments, segment_cap

    segs = row_segments(n, batch, patch)
    assert segs[0][0] == 0 and segs[-1][1] == n
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(segs, segs[1:], strict=False))
    cap = segment_cap(batch, patch)
    assert cap % batch == 0 and cap >= batch
    for a, b in segs[:-1]:
        assert (b - a) % batch == 0 and b - a <= cap
    lengths = [b - a for a, b in segs]
    assert max(lengths) - min(lengths) < 2 * batch  # near-equal: no one-patch tail beside a full one


@pytest.mark.parametrize("w,y0,xs", [(24, -4, [-4]), (24, 0, [-8]), (100, 0, [-20, 12, 44, 76]),
                                     (96, 0, [0, 32, 64]), (90, -3, [10, 42, 74])])
def test_gather_scatter_cut_patches(w, y0, xs):
    """Patches cut on the left, right or both sides gather exactly the canvas pixels they cover."""
    ctx = _stage_ctx(GaussianDenoiser(), r=0, h=40, w=w)
    data = torch.arange(3 * 40 * w, dtype=torch.float32).reshape(3, 40, w)
    band = Band(40, w, 0, 40, data.clone())
    seg = _Segment(ctx, 0, y0, xs, band, None)
    x = seg.gather(1.0)
    for j, x0 in enumerate(xs):
        ya, yb, xa, xb = Patch(y0, x0, 32).valid(40, w)
        assert torch.equal(x[j][:, ya - y0 : yb - y0, xa - x0 : xb - x0], data[:, ya:yb, xa:xb])
    seg.scatter(-x)
    covered = torch.zeros(40, w, dtype=torch.bool)
    for x0 in xs:
        ya, yb, xa, xb = Patch(y0, x0, 32).valid(40, w)
        covered[ya:yb, xa:xb] = True
    assert torch.equal(band.data[:, covered], -data[:, covered])
    assert torch.equal(band.data[:, ~covered], data[:, ~covered])
