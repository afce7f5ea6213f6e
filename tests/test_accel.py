"""--channels-last and --compile: wired through to the network, recorded in the key, same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsigen import api
from wsigen.run import accel
from wsigen.run.config import Request, RunSpec, SlideConfig
from wsigen.run.session import merge_resume
from wsigen.slides import checkpoint
from wsigen.slides.store import SlideStore


def _final(out) -> np.ndarray:
    s = SlideStore.open(out)
    return np.asarray(s.stage_array(len(s.info["stages"]) - 1)[:])


@pytest.fixture(scope="module")
def eager(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("accel") / "eager.zarr"
    api.sample(out, 96, model=str(tiny_model), channels_last=False, checkpoint_every=0)
    return out


def test_channels_last_wrapper_matches_and_feeds_nhwc(tiny_model):
    lm = checkpoint.load_model(str(tiny_model))
    seen = []
    net = accel.prepare(lm.denoiser, torch.device("cpu"), channels_last=True)
    net.net.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(4, 3, 32, 32)
    sigma, mpp = torch.tensor([2.0]), torch.tensor([1.0])
    ref = checkpoint.load_model(str(tiny_model)).denoiser(x, sigma, mpp)
    with torch.no_grad():
        out = net(x, sigma, mpp)
    assert seen == [True]
    assert torch.allclose(out, ref, atol=1e-5)


def test_channels_last_sample_is_recorded_and_close(tiny_model, eager, tmp_path):
    out = tmp_path / "cl.zarr"
    api.sample(out, 96, model=str(tiny_model), checkpoint_every=0)  # channels-last by default
    cfg = SlideStore.open(out).info["config"]
    assert cfg["channels_last"] is True and cfg["compile"] is False
    assert SlideStore.open(eager).info["config"]["channels_last"] is False
    diff = np.abs(_final(out).astype(int) - _final(eager).astype(int))
    assert diff.max() <= 2, diff.max()


def test_compile_is_wired_through(tiny_model, eager, tmp_path, monkeypatch):
    """With the 'eager' backend dynamo traces the network but runs the same kernels: same bytes."""
    monkeypatch.setenv(accel.BACKEND_ENV, "eager")
    calls = []
    real = torch.compile

    def spy(model, **kw):
        calls.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    out = tmp_path / "c.zarr"
    api.sample(out, 96, model=str(tiny_model), compile=True, channels_last=False, checkpoint_every=0)
    assert calls == [{"backend": "eager", "dynamic": False}]
    assert SlideStore.open(out).info["config"]["compile"] is True
    assert np.array_equal(_final(out), _final(eager))
    stored = SlideStore.open(out).info["config"]
    assert "compile" in SlideConfig.KEY_FIELDS and "channels_last" in SlideConfig.KEY_FIELDS
    with pytest.raises(Exception, match="compile False"):  # --resume cannot change it
        merge_resume(stored, RunSpec(str(out), Request(compile=False)), torch.device("cpu"))


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(accel.BACKEND_ENV, raising=False)
    monkeypatch.setattr(accel, "has_compiler", lambda: False)
    with pytest.raises(Exception, match="C\\+\\+ compiler"):
        accel.prepare(torch.nn.Identity(), torch.device("cpu"), compile=True)


@pytest.mark.slow
def test_inductor_compiled_network_matches_eager(tiny_model):
    lm = checkpoint.load_model(str(tiny_model))
    net = accel.prepare(checkpoint.load_model(str(tiny_model)).denoiser, torch.device("cpu"), compile=True)
    x = torch.randn(8, 3, 32, 32)
    sigma, mpp = torch.tensor([2.0]), torch.tensor([1.0])
    with torch.no_grad():
        assert torch.allclose(net(x, sigma, mpp), lm.denoiser(x, sigma, mpp), atol=1e-4)
