"""GPU out of memory (issue 17, item 4): a clean, resumable stop; ``--resume --batch B`` continues
from the last checkpoint and records the change; the bytes equal a run with the same history."""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from clitools import invoke, wsigen
from test_resume import ARGS, assert_same_store, killed

from wsigen import faults
from wsigen.slides import checkpoint
from wsigen.slides.store import SlideStore


class Flaky(torch.nn.Module):
    """The denoiser, but a forward pass runs out of memory once ``countdown`` calls have passed."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.countdown = inner, None

    def forward(self, *a, **k):
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown <= 0:
                self.countdown = None
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.inner(*a, **k)


def test_injected_oom_leaves_a_resumable_store(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "o.zarr"
    flaky = []
    load = checkpoint.load_model

    def load_flaky(*a, **k):
        lm = load(*a, **k)
        flaky.append(Flaky(lm.denoiser))
        return replace(lm, denoiser=flaky[-1])

    real_point = faults.point

    def arm(name, *detail):  # after stage 2's checkpoint at step 2: OOM inside step 3's passes
        if name == "step" and detail == (2, 1) and flaky:
            flaky[-1].countdown = 3
        real_point(name, *detail)

    monkeypatch.setattr(checkpoint, "load_model", load_flaky)
    monkeypatch.setattr(faults, "point", arm)
    r = invoke("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", "2", "--batch", "4")
    monkeypatch.undo()
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "L = 3" in lines[0], r.stderr  # the plan line, then the error
    assert ("out of GPU memory in stage 2 at step 3 of 4 with --batch 4; the store is resumable from its "
            "checkpoint after step 2: continue with a smaller batch: "
            f"wsigen sample --resume -o {out} --batch 2") in lines[-1]
    s = SlideStore.open(out)
    assert not s.complete and s.state_info() == {"stage": 2, "step": 2}
    assert s.info["stages_complete"] == [0, 1]

    r = invoke("sample", "--resume", "-o", out, "--batch", "2")
    assert r.exit_code == 0, r.output
    d = json.loads(invoke("info", out, "--json").stdout)
    change = {"stage": 2, "step": 2, "old": 4, "new": 2}
    assert d["complete"] and d["batch_changes"] == [change]
    info = SlideStore.open(out).info
    assert info["config"]["batch"] == 2 and info["config"]["batch_changes"] == [change]
    assert info["key"]["batch_changes"] == [change]
    assert "batch      4 → 2 from stage 2 step 2" in invoke("info", out).stdout

    # the same history without a fault: batch 4 killed after that checkpoint, resumed with batch 2
    same = tmp_path / "h.zarr"
    assert killed(same, tiny_model, "step:10", "--checkpoint-every", "2", "--batch", "4").returncode == -9
    assert SlideStore.open(same).state_info() == {"stage": 2, "step": 2}
    assert invoke("sample", "--resume", "-o", same, "--batch", "2").exit_code == 0
    assert_same_store(out, same)


def test_oom_through_the_command_line_is_one_line_and_exit_1(tmp_path, tiny_model):
    """``WSIGEN_FAULT=step:N:OOM``: a real process, the first stage, no checkpoint yet."""
    out = tmp_path / "c.zarr"
    r = wsigen("sample", "--model", tiny_model, *ARGS, "-o", out, "--batch", "1", fault="step:2:OOM")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in r.stderr  # the plan line, then the error
    # the fault fires once step 2 is done: step 3 is the one that ran out
    assert "out of GPU memory in stage 0 at step 3 of 4 with --batch 1" in lines[-1]
    assert "resumable from the start of stage 0" in lines[-1] and "--batch 1 is the smallest" in lines[-1]
    assert SlideStore.open(out).state_info() is None
    r = invoke("sample", "--resume", "-o", out)
    assert r.exit_code == 0, r.output
