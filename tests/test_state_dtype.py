"""`--state-dtype float16`: half the state memory, a small measured error, the same guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clitools import interrupt_at

from wsigen import api, faults
from wsigen.errors import UsageError
from wsigen.method.cascade import diffuse, initial_band
from wsigen.method.stages import Settings, StageContext, plan_stages
from wsigen.nets import GaussianDenoiser
from wsigen.run import preflight
from wsigen.slides.store import SlideStore


def _final(out) -> np.ndarray:
    s = SlideStore.open(out)
    return np.asarray(s.stage_array(len(s.info["stages"]) - 1)[:])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    outs = {}
    for dt in ("float32", "float16"):
        outs[dt] = root / f"{dt}.zarr"
        api.sample(outs[dt], 128, model=str(tiny_model), state_dtype=dt, checkpoint_every=0)
    return outs


def test_float16_state_is_close_to_float32_but_not_the_same(pair):
    a, b = _final(pair["float32"]), _final(pair["float16"])
    assert a.shape == b.shape == (3, 128, 128)
    assert not np.array_equal(a, b)  # it really ran in float16
    assert _psnr(a, b) >= 35.0, _psnr(a, b)
    assert SlideStore.open(pair["float16"]).info["config"]["state_dtype"] == "float16"


def test_float16_band_and_estimate_are_half():
    s = Settings(steps=4, guided_steps=2, state_dtype="float16").validate()
    ctx = StageContext(GaussianDenoiser(), s, 0, 1, 64, 96, 1.0, 32, 2, (0.9, 0.9, 0.9), torch.device("cpu"))
    band = initial_band(ctx, 0, 64)
    assert band.data.dtype == torch.float16
    band = diffuse(ctx, band, None)
    assert band.data.dtype == torch.float16 and torch.isfinite(band.data).all()
    plans = plan_stages(4096, 4096, 64, 2, 1.0)
    n32 = preflight.estimate(plans, 64, 2, 8, 1000)
    n16 = preflight.estimate(plans, 64, 2, 8, 1000, state_bytes=2)
    assert n16.state_per_rank * 2 == n32.state_per_rank
    assert "float16 band" in n16.state_line()
    with pytest.raises(UsageError, match="state-dtype"):
        Settings(state_dtype="int8").validate()


def test_float16_resume_is_byte_identical(tmp_path, tiny_model, pair, monkeypatch):
    """Interrupted mid-stage (the checkpoint holds the float16 state as float16) and resumed."""
    out = tmp_path / "r.zarr"
    real = interrupt_at(monkeypatch, "step", (2, 3))
    with pytest.raises(KeyboardInterrupt):
        api.sample(out, 128, model=str(tiny_model), state_dtype="float16", checkpoint_every=1)
    monkeypatch.setattr(faults, "point", real)
    assert SlideStore.open(out).state_info() is not None
    assert SlideStore.open(out).group["state/x"].dtype == np.float16
    with pytest.raises(UsageError, match="state_dtype"):  # part of the reproducibility key
        api.sample(out, state_dtype="float32", resume=True)
    api.sample(out, resume=True)
    assert np.array_equal(_final(out), _final(pair["float16"]))
