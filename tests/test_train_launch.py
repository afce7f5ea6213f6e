"""``wsigen train --workers N --device cpu``: ranks started and watched by the launcher, a killed
rank named, the last checkpoint resumed exactly; --gpus beyond the visible devices refused."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import torch
from clitools import invoke, wsigen
from safetensors.torch import load_file

from wsigen.slides import checkpoint

TINY = ["--patch", "16", "--width", "8", "--mults", "1,2", "--batch", "4", "--mpp", "1",
        "--preview-every", "0", "--sample-steps", "3", "--seed", "2", "--loader-workers", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    rng = np.random.default_rng(1)
    img = np.clip(np.array([215, 140, 185]) + rng.normal(0, 25, (96, 96, 3)), 0, 255).astype(np.uint8)
    d = tmp_path_factory.mktemp("slides")
    (d / "a.png").write_bytes(imagecodecs.png_encode(img))
    return d


def _weights(out):
    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_two_cpu_ranks_train_sample_and_a_killed_rank_resumes_exactly(slides, tmp_path):
    full = tmp_path / "full"
    r = wsigen("train", slides, "-o", full, "--max-steps", "4", "--checkpoint-every", "2",
               "--workers", "2", *TINY)
    assert r.returncode == 0, r.stderr
    cfg = checkpoint.load_model(full).config
    assert cfg["training"]["step"] == 4
    r = wsigen("sample", "--model", full, "-o", tmp_path / "s.zarr", "--size", "32", "--steps", "3")
    assert r.returncode == 0, r.stderr

    # rank 1 killed after its third step: named in one line; the step-2 checkpoint resumes
    cut = tmp_path / "cut"
    r = wsigen("train", slides, "-o", cut, "--max-steps", "4", "--checkpoint-every", "2",
               "--workers", "2", *TINY, fault="train-step:3", fault_rank=1)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "training rank 1 of 2 was killed by SIGKILL" in line and "--resume" in line
    assert checkpoint.load_model(cut).config["training"]["step"] == 2
    r = wsigen("train", slides, "-o", cut, "--max-steps", "4", "--checkpoint-every", "2",
               "--workers", "2", "--resume", *TINY)
    assert r.returncode == 0, r.stderr
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_process_counts_are_refused(slides, tmp_path):
    out = tmp_path / "x"
    r = invoke("train", slides, "-o", out, "--gpus", "64", *TINY[:-2])
    assert r.exit_code == 1 and "CUDA device" in r.output and len(r.output.strip().splitlines()) == 1
    for args, code, match in [
        (["--gpus", "2", *TINY], 2, "--gpus"),
        (["--workers", "3", *TINY], 2, "not divisible"),
        (["--precision", "fp16", "--max-steps", "1", *TINY], 2, "fp16"),
        (["--precision", "fp8", *TINY], 2, "--precision"),
        (["--grad-accum", "3", *TINY], 2, "grad-accum"),
    ]:
        r = invoke("train", slides, "-o", out, *args)
        assert r.exit_code == code and match in r.output, (args, r.output)
    assert not out.exists()


def test_grad_accum_runs_and_keeps_the_batch(slides, tmp_path):
    out = tmp_path / "acc"
    r = invoke("train", slides, "-o", out, "--max-steps", "2", "--grad-accum", "2", *TINY)
    assert r.exit_code == 0, r.output
    assert checkpoint.load_model(out).config["training"]["batch"] == 4


def test_joining_an_external_job(monkeypatch):
    from wsigen.errors import UsageError
    from wsigen.training import launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.processes_for(None, None, "cpu") == (0, "cpu")  # one rank of torchrun's job
    assert launch.processes_for(2, None, "cpu") == (0, "cpu")
    assert launch.processes_for(None, 2, "auto") == (0, "cuda")
    with pytest.raises(UsageError, match="WORLD_SIZE=2"):
        launch.processes_for(3, None, "cpu")
    monkeypatch.delenv("WORLD_SIZE")
    assert launch.processes_for(None, None, "cpu") == (1, "cpu")


def test_two_ranks_train_labelled_even_when_a_rank_drops_every_label(tmp_path):
    """DDP needs every parameter used in every step: with label dropout 0.9 a rank often drops
    all its labels, and the class embedding must still take part (nets.unet adds zeros then)."""
    rng = np.random.default_rng(2)
    d = tmp_path / "slides"
    for cls, base in (("a", (215, 140, 185)), ("b", (150, 110, 190))):
        (d / cls).mkdir(parents=True)
        img = np.clip(np.array(base) + rng.normal(0, 25, (96, 96, 3)), 0, 255).astype(np.uint8)
        (d / cls / f"{cls}.png").write_bytes(imagecodecs.png_encode(img))
    out = tmp_path / "m"
    r = wsigen("train", d, "-o", out, "--max-steps", "3", "--workers", "2", "--labels", "folders",
               "--label-dropout", "0.9", *TINY)
    assert r.returncode == 0, r.stderr
    cfg = checkpoint.load_model(out).config
    assert cfg["classes"] == ["a", "b"] and cfg["training"]["step"] == 3
