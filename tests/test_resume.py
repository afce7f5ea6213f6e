"""Resume (design.md §2 Determinism, §4 Store): a run killed anywhere and resumed with
``wsigen sample --resume`` gives the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clitools import interrupt_at
from typer.testing import CliRunner

from wsigen import api
from wsigen.cli.app import app
from wsigen.slides.store import SlideStore

ARGS = ["--size", "160x128", "--steps", "4", "--device", "cpu", "--threads", "1", "--seed", "3"]
runner = CliRunner()


def files(root: Path) -> dict[str, bytes]:
    """Every file of a store, by relative path: arrays' chunks and metadata, byte for byte."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    """Same files, same chunk bytes, same attributes (but for the name, which is the folder's)."""
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if k != "zarr.json":
            assert fa[k] == fb[k], k
    ja, jb = (json.loads(f["zarr.json"])["attributes"] for f in (fa, fb))
    for j in (ja, jb):
        j["ome"]["multiscales"][0].pop("name")
    assert ja == jb


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output + (r.stderr or "")
    return r


def killed(out: Path, model: Path, fault: str, *extra) -> subprocess.CompletedProcess:
    """``wsigen sample`` in a child process that SIGKILLs itself at ``fault`` (wsigen.faults)."""
    env = {**os.environ, "WSIGEN_FAULT": fault, "WSIGEN_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-c", "from wsigen.cli import main; main()", "sample", "--model", str(model),
           *ARGS, "-o", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run (no mid-stage checkpoints)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = cli("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", "0")
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("fault, every, saved", [
    ("stage:1", 0, None),  # after stage 0 is complete
    ("chunk-row:4", 2, {"stage": 3, "step": 2}),  # last stage written, not yet marked: resume from step 2
    ("state-chunk:4", 2, None),  # midway through the last stage's checkpoint: that stage restarts
])
def test_resume_after_kill_is_byte_identical(tmp_path, tiny_model, reference, fault, every, saved):
    out = tmp_path / "s.zarr"
    r = killed(out, tiny_model, fault, "--checkpoint-every", str(every))
    assert r.returncode == -9, r.stderr.decode()
    s = SlideStore.open(out)
    assert not s.complete and s.state_info() == saved
    r = cli("sample", "--resume", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert_same_store(out, reference)
    if saved:  # the resumed run did only the last stage's steps 2 and 3
        full = json.loads(cli("info", reference, "--json").stdout)
        assert full["complete"]
        assert json.loads(r.stdout)["evaluations"] < 310 // 2


def test_checkpointing_does_not_change_the_bytes(tmp_path, tiny_model, reference):
    out = tmp_path / "c.zarr"
    assert cli("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", "1").exit_code == 0
    assert_same_store(out, reference)


def test_interrupt_then_resume_with_stored_configuration(tmp_path, tiny_model, reference, monkeypatch):
    """Ctrl-C after the last stage (before the pyramid): exit 130 with the resume hint; options that
    contradict the store are refused; the stored configuration finishes the same bytes."""
    out = tmp_path / "i.zarr"
    interrupt_at(monkeypatch, "stage", (3,))
    r = cli("sample", "--model", tiny_model, *ARGS, "-o", out)
    monkeypatch.undo()
    assert r.exit_code == 130
    assert f"wsigen sample --resume -o {out}" in r.stderr
    d = json.loads(cli("info", out, "--json").stdout)
    assert d["complete"] is False and d["stages_complete"] == [0, 1, 2, 3]

    r = cli("sample", "--resume", "-o", out, "--seed", "4", "--steps", "5")
    assert r.exit_code == 2
    assert "seed 4" in r.stderr and "steps 5" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("sample", "--resume", "--overwrite", "-o", out)
    assert r.exit_code == 2

    r = cli("sample", "--resume", "-o", out, "--seed", "3")  # agreeing options are fine
    assert r.exit_code == 0, r.output
    assert_same_store(out, reference)
    r = cli("sample", "--resume", "-o", out)
    assert r.exit_code == 1 and "already complete" in r.stderr


def test_resume_of_missing_store(tmp_path):
    r = cli("sample", "--resume", "-o", tmp_path / "none.zarr")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_python_api_resume(tmp_path, tiny_model, reference, monkeypatch):
    out = tmp_path / "p.zarr"
    interrupt_at(monkeypatch, "stage", (1,))
    with pytest.raises(KeyboardInterrupt):
        api.sample(out, "160x128", model=str(tiny_model), steps=4, device="cpu", threads=1, seed=3,
                   checkpoint_every=0)
    monkeypatch.undo()
    api.sample(out, resume=True, device="cpu")
    assert_same_store(out, reference)


@pytest.fixture(scope="module")
def multistep_reference(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted DPM-Solver++(2M) run, part-way start (no mid-stage checkpoints)."""
    out = tmp_path_factory.mktemp("ms") / "ref.zarr"
    r = cli("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", "0",
            "--solver", "dpmpp2m", "--start-sigma", "5")
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_multistep_history_survives_checkpoint_and_resume(tmp_path, tiny_model, multistep_reference, workers):
    """Killed after the last stage's step 2 is checkpointed: x and the history (state/d) resume
    to the same bytes; with 2 workers the history moves between ranks with the rows."""
    out = tmp_path / "m.zarr"
    # "step" counts every stage's steps: 4 + 4 + 4 + 2 → after stage 3's second step
    r = killed(out, tiny_model, "step:14", "--checkpoint-every", "1", "--solver", "dpmpp2m",
               "--start-sigma", "5")
    assert r.returncode == -9, r.stderr.decode()
    s = SlideStore.open(out)
    assert s.state_info() == {"stage": 3, "step": 2} and "state/d" in s.group
    assert np.abs(np.asarray(s.group["state/d"])).max() > 0  # a real history, not a placeholder
    r = cli("sample", "--resume", "-o", out, "--workers", workers, "--json")
    assert r.exit_code == 0, r.output
    assert_same_store(out, multistep_reference)


@pytest.mark.parametrize("every", [0, 1])
def test_multistep_same_bytes_with_two_workers(tmp_path, tiny_model, multistep_reference, every):
    """Two ranks exchange the history with the rows (and, every = 1, both save it each step)."""
    out = tmp_path / "w2.zarr"
    r = cli("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", every,
            "--solver", "dpmpp2m", "--start-sigma", "5", "--workers", "2")
    assert r.exit_code == 0, r.output
    assert_same_store(out, multistep_reference)
