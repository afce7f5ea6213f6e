"""Parallel loading: the same patches, loss noise and dropout for 0, 1 and 2 loader workers and
across a resume; no slide handle crosses a fork; the data-wait share is logged."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from wsigen.slides import readers
from wsigen.training import data, keyed, loader, train

TINY = dict(patch=16, width=8, mults=(1, 2), batch=4, lr=2e-3, lr_warmup=1, preview_every=0,
            checkpoint_every=1000, sample_steps=4, seed=5, device="cpu", dropout=0.2)


def _tissue(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (240, 238, 245), np.uint8)
    img[:, : size // 2] = np.clip(np.array([220, 140, 190]) + rng.normal(0, 25, (size, size // 2, 3)),
                                  0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def tiff(tmp_path_factory):
    """A tiled TIFF at 0.5 µm/px: read through tifffile (a file handle), not from memory."""
    p = tmp_path_factory.mktemp("loader") / "slide.tif"
    tifffile.imwrite(p, _tissue(384), tile=(64, 64), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    return p


def _sampler(path, cache_pixels=0):
    return data.PatchSampler(data.load_slides([path], cache_pixels=cache_pixels), 32, 0.5, 2.0)


def _batches(path, workers, start=0, stop=4, cache_pixels=0):
    b = loader.Batches(_sampler(path, cache_pixels), 7, 0, 3, start, stop, workers, "cpu")
    try:
        return [next(b) for _ in range(stop - start)]
    finally:
        b.close()


def test_same_batches_for_any_number_of_workers_and_a_resume(tiff):
    ref = _batches(tiff, 0)
    assert ref[0][0].shape == (3, 3, 32, 32) and ref[0][0].dtype == torch.float32
    assert -1 <= float(ref[0][0].min()) and float(ref[0][0].max()) <= 1
    assert not torch.equal(ref[0][0], ref[1][0])  # steps differ
    assert ref[0].labels is None and ref[0].nuclei is None  # class-free, no morphology weight
    for workers in (1, 2):
        got = _batches(tiff, workers)
        for (x, s, *_), (xr, sr, *_) in zip(got, ref, strict=True):
            assert torch.equal(x, xr) and torch.equal(s, sr)
    tail = _batches(tiff, 2, start=2)  # a run resumed at step 2
    for (x, s, *_), (xr, sr, *_) in zip(tail, ref[2:], strict=True):
        assert torch.equal(x, xr) and torch.equal(s, sr)
    # each patch is a function of its key: the sampler's own draw gives the same pixels
    img, s = _sampler(tiff).keyed_patch(7, 1, 0, 2)
    assert torch.equal(ref[1][0][2], torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)
    assert float(ref[1][1][2]) == pytest.approx(s)


def test_no_slide_handle_crosses_a_fork(tiff, tmp_path, monkeypatch):
    opened = tmp_path / "opened.txt"
    real = readers.open_image

    def logged(*a, **kw):
        with open(opened, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*a, **kw)

    monkeypatch.setattr(readers, "open_image", logged)
    sampler = _sampler(tiff)
    sd = sampler.slides[0]
    assert isinstance(sd.slide, readers.TiffSlide)
    parent = os.getpid()
    b = loader.Batches(sampler, 7, 0, 3, 0, 6, 2, "cpu")
    # the parent's handle is closed before any worker exists
    assert sd.released and sd.slide._tf.filehandle.closed
    got = [next(b) for _ in range(6)]
    b.close()
    pids = [int(v) for v in opened.read_text().split()]
    assert pids[0] == parent  # load_slides, before the fork
    workers = pids[1:]
    assert len(workers) == 2 and parent not in workers and len(set(workers)) == 2
    ref = _batches(tiff, 0, stop=6)
    assert all(torch.equal(b.x, br.x) for b, br in zip(got, ref, strict=True))


def test_in_memory_slides_are_shared_not_reopened(tiff):
    sampler = _sampler(tiff, cache_pixels=2**20)
    assert isinstance(sampler.slides[0].slide, readers.ArraySlide)
    a = _batches(tiff, 2, cache_pixels=2**20)
    # the cached copy reads the same pixels as the file
    assert all(torch.equal(b.x, br.x) for b, br in zip(a, _batches(tiff, 0), strict=True))


def test_dropout_masks_are_keyed():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    with keyed.dropout_masks(1, 2, 0, 0, "cpu"):
        a = drop(x)
    torch.rand(3)  # the global generator moves on; the keyed masks do not care
    with keyed.dropout_masks(1, 2, 0, 0, "cpu"):
        b = drop(x)
    with keyed.dropout_masks(1, 3, 0, 0, "cpu"):
        c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    before = torch.random.get_rng_state()
    with keyed.dropout_masks(1, 2, 0, 0, "cpu"):
        drop(x)
    assert torch.equal(before, torch.random.get_rng_state())  # restored


def _weights(out):
    return load_file(out / "model.safetensors")


def test_training_is_the_same_for_0_1_2_workers_and_across_a_resume(tiff, tmp_path):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train([tiff], out, max_steps=4, loader_workers=workers, **TINY)
        runs[workers] = _weights(out)
        rows = [json.loads(v) for v in (out / "loss.jsonl").read_text().splitlines()]
        assert all(0 <= r["data_wait"] <= 1 for r in rows)
    # a run stopped at step 2 with 1 worker, resumed with 2: the same weights as without a stop
    out = tmp_path / "resumed"
    train([tiff], out, max_steps=2, loader_workers=1, **TINY)
    train([tiff], out, resume=True, max_steps=4, loader_workers=2)
    runs["resumed"] = _weights(out)
    for name in (2, "resumed"):
        assert runs[name].keys() == runs[0].keys()
        for k in runs[0]:
            assert torch.equal(runs[name][k], runs[0][k]), (name, k)


def test_default_workers():
    n = loader.default_workers(1)
    assert 0 <= n <= 4 and loader.default_workers(10**6) == 0


def test_older_train_state_is_refused(tiff, tmp_path):
    from wsigen.errors import WsigenError

    out = tmp_path / "old"
    train([tiff], out, max_steps=1, loader_workers=0, **TINY)
    st = out / "train-state" / "state.json"
    info = json.loads(st.read_text())
    del info["rng"]["version"]  # as written before keyed patches
    st.write_text(json.dumps(info))
    with pytest.raises(WsigenError, match="older wsigen"):
        train([tiff], out, resume=True, max_steps=2)
