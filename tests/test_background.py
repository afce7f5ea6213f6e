"""Background skipping: glass patches skip the network, tissue is unchanged, evaluations drop."""

import numpy as np
import torch

from wsigen.method.canvas import GuideBand, to_uint8
from wsigen.method.cascade import GlassMap, diffuse, initial_band
from wsigen.method.gridshift import Patch
from wsigen.method.stages import Settings, StageContext
from wsigen.nets import GaussianDenoiser
from wsigen.slides.checkpoint import load_model

BG = (242, 240, 244)


def _half_glass_guide(h, w):
    rng = np.random.default_rng(0)
    g = np.empty((3, h // 2, w // 2), dtype=np.uint8)
    g[:] = np.array(BG, dtype=np.uint8).reshape(3, 1, 1)
    g[:, :, : w // 4] = rng.integers(60, 220, size=(3, h // 2, w // 4))  # tissue on the left half
    return GuideBand(0, h // 2, g)


def _run(model, skip, h=128, w=256, r=8, steps=8):
    s = Settings(steps=steps, guided_steps=r, batch=4, skip_background=skip, background_tolerance=2)
    bg = tuple(v / 127.5 - 1 for v in BG)
    ctx = StageContext(model, s, seed=4, stage=1, height=h, width=w, mpp=2.0, patch=32, k=2,
                       background=bg, device=torch.device("cpu"))
    out = diffuse(ctx, initial_band(ctx, 0, h), _half_glass_guide(h, w)).data
    return out, ctx.stats


def _psnr(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_glass_map_queries():
    g = _half_glass_guide(64, 128)
    gm = GlassMap(g, BG, 2)
    ctx = StageContext(None, Settings(), 0, 1, 64, 128, 1.0, 32, 2, (0, 0, 0), torch.device("cpu"))
    assert gm.is_glass(Patch(0, 96, 32), ctx)  # right half: glass
    assert not gm.is_glass(Patch(0, 0, 32), ctx)  # left half: tissue
    assert not gm.is_glass(Patch(0, 48, 32), ctx)  # straddles the border
    assert gm.is_glass(Patch(-16, 112, 32), ctx)  # padding counts as glass


def test_skipping_keeps_tissue_and_saves_evaluations_gaussian():
    a, sa = _run(GaussianDenoiser(), skip=False)
    b, sb = _run(GaussianDenoiser(), skip=True)
    assert sb["skipped"] > 0 and sb["evaluations"] < 0.75 * sa["evaluations"]
    # pixel-wise model: the tissue half is unaffected bit for bit
    assert torch.equal(a[:, :, :64], b[:, :, :64])
    # glass patches end on the glass colour
    assert np.abs(to_uint8(b[:, :, 192:]).astype(int) - np.array(BG).reshape(3, 1, 1)).max() <= 1


def test_skipping_keeps_tissue_conv_net(tiny_model):
    model = load_model(tiny_model).denoiser
    a, sa = _run(model, skip=False)
    b, sb = _run(model, skip=True)
    assert sb["evaluations"] < 0.75 * sa["evaluations"]
    assert _psnr(to_uint8(a[:, :, :128]), to_uint8(b[:, :, :128])) >= 35  # the whole tissue half
