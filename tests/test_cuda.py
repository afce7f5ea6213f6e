"""The CUDA paths (``-m cuda``; ``benchmarks/gpu/run.sh`` runs them on a GPU).

Same bytes: the state band on the GPU or in host memory, pinned or plain staging copies, an
interrupted and resumed run. Close (they are in the key, so not equal): bf16 vs fp32 autocast,
torch.compile vs eager, channels-last vs not. Without a GPU every test is skipped, except with
WSIGEN_CUDA_DRY=1 (``run.sh --dry-run``), which runs those that make sense on the CPU, on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr

import wsigen

pytestmark = pytest.mark.cuda
HAVE_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAVE_CUDA else ("cpu" if os.environ.get("WSIGEN_CUDA_DRY") else None)
needs_device = pytest.mark.skipif(DEV is None, reason="no CUDA device (WSIGEN_CUDA_DRY=1 runs these on the CPU)")
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
SIZE, STEPS = 256, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small class-conditional UNet (patch 64, attention at the lowest level)."""
    from wsigen.slides.checkpoint import init_model

    path = tmp_path_factory.mktemp("cuda") / "m.safetensors"
    init_model(path, {"width": 16, "mults": [1, 2, 2], "attn_levels": [2]}, seed=3, patch=64, steps=STEPS,
               guided_steps=3, mpp_range=[0.25, 256.0], recommended_size=SIZE, final_mpp=1.0,
               classes=["a", "b"])
    return path


def _sample(out, model, **kw) -> np.ndarray:
    kw = {"size": SIZE, "steps": STEPS, "device": DEV, "seed": 4, "threads": 1 if DEV == "cpu" else None, **kw}
    wsigen.sample(out, model=str(model), overwrite=True, **kw)
    return zarr.open_group(str(out), mode="r")["0"][:]


@needs_cuda
def test_state_band_on_the_gpu_or_in_host_memory_gives_the_same_bytes(model, tmp_path):
    a = _sample(tmp_path / "gpu.zarr", model, state_device="cuda")
    b = _sample(tmp_path / "host.zarr", model, state_device="cpu")
    assert np.array_equal(a, b)


@needs_cuda
def test_pinned_and_plain_staging_copies_give_the_same_bytes(model, tmp_path, monkeypatch):
    from wsigen.method.stages import StageContext

    a = _sample(tmp_path / "pinned.zarr", model, state_device="cpu")
    calls = []

    def plain(self, shape):
        calls.append(shape)
        return torch.empty(shape, dtype=torch.float32)  # pageable: the copies are synchronous

    monkeypatch.setattr(StageContext, "staging", plain)
    b = _sample(tmp_path / "plain.zarr", model, state_device="cpu")
    assert calls and np.array_equal(a, b)


@needs_device
@pytest.mark.parametrize("state_device", ["auto", "cpu"])
def test_an_interrupted_and_resumed_run_gives_the_same_bytes(model, tmp_path, monkeypatch, state_device):
    from clitools import interrupt_at

    if DEV == "cpu" and state_device == "auto":
        pytest.skip("on the CPU the state is always in host memory")
    ref = _sample(tmp_path / "ref.zarr", model, state_device=state_device, checkpoint_every=1)
    out = tmp_path / "cut.zarr"
    interrupt_at(monkeypatch, "step", (2, 2))  # stage 2, after step 2: a mid-stage checkpoint
    with pytest.raises(KeyboardInterrupt):
        _sample(out, model, state_device=state_device, checkpoint_every=1)
    monkeypatch.undo()
    wsigen.sample(out, resume=True, device=DEV, state_device=state_device)
    assert np.array_equal(zarr.open_group(str(out), mode="r")["0"][:], ref)


def _close(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float((d.astype(np.float64) ** 2).mean())
    return {"mean_abs": float(d.mean()), "psnr": 10 * np.log10(255**2 / mse) if mse else float("inf")}


@needs_device
@pytest.mark.parametrize("variant", ["bf16", "compile", "no-channels-last"])
def test_variants_are_close_to_fp32_eager_channels_last(model, tmp_path, variant, monkeypatch):
    """Not equal (each is in the key), but the same slide to within a few grey levels."""
    if variant == "compile" and DEV == "cpu":
        monkeypatch.setenv("WSIGEN_COMPILE_BACKEND", "eager")  # the wiring, not inductor, on the CPU
    ref = _sample(tmp_path / "ref.zarr", model)
    kw = {"bf16": {"precision": "bf16"}, "compile": {"compile": True},
          "no-channels-last": {"channels_last": False}}[variant]
    out = _sample(tmp_path / f"{variant}.zarr", model, **kw)
    c = _close(ref, out)
    print(f"{variant} on {DEV}: mean |Δ| {c['mean_abs']:.3f} grey levels, PSNR {c['psnr']:.1f} dB")
    limit = 4.0 if variant == "bf16" else 1.0
    assert c["mean_abs"] <= limit, c


@needs_device
def test_class_guided_sampling_repeats_exactly_and_differs_by_class(model, tmp_path):
    """Classifier-free guidance (w = 3: one doubled batch per call) on the device: the same bytes
    twice, and another class gives another slide."""
    a = _sample(tmp_path / "a1.zarr", model, class_name="a", guidance=3.0)
    assert np.array_equal(a, _sample(tmp_path / "a2.zarr", model, class_name="a", guidance=3.0))
    assert not np.array_equal(a, _sample(tmp_path / "b.zarr", model, class_name="b", guidance=3.0))
