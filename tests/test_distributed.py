"""Sharding across processes (design.md §4 "Distributed"): same bytes for any number of workers.

The end-to-end checks fork real workers over gloo (``launch``: Accelerate's launcher) and compare
stores byte for byte; the convolutional ``tiny_model`` shows batch and boundary mistakes that the
pixel-wise ``gaussian`` model cannot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from wsigen import api
from wsigen.cli.app import app
from wsigen.errors import UsageError, WsigenError
from wsigen.method.gridshift import axis_starts, row_span
from wsigen.run.config import Request, RunSpec
from wsigen.run.distributed import DistTopology, chunk_rows, exchange_plan, plan_line

runner = CliRunner()
WSIGEN = str(Path(sys.executable).with_name("wsigen"))


def pixels(path, name="0") -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[name][:])


def same_store(a, b) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    stages = ga.attrs["wsigen"]["stages"]
    assert ga.attrs["wsigen"]["complete"] and gb.attrs["wsigen"]["complete"]
    for st in stages:
        n = "0" if st["index"] == len(stages) - 1 else f"stages/{st['index']}"
        np.testing.assert_array_equal(pixels(a, n), pixels(b, n), err_msg=n)


# -- pure index arithmetic -----------------------------------------------------------------
@pytest.mark.parametrize("height,patch,world",
                         [(256, 32, 2), (250, 32, 3), (64, 32, 5), (1000, 64, 4)])
@pytest.mark.parametrize("offset", [0, 2, 30])
def test_rank_rows_are_disjoint_and_cover(height, patch, world, offset):
    rows = axis_starts(height, offset % patch, patch)
    mine = [DistTopology(r, world).pick_rows(rows) for r in range(world)]
    assert sum(mine, []) == rows  # contiguous, in order, every row once
    spans = [row_span(m, patch, height) for m in mine if m]
    assert spans[0][0] == 0 and spans[-1][1] == height
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("height,chunk,world",
                         [(1024, 512, 2), (1000, 512, 3), (100, 512, 3), (2048, 256, 3)])
def test_stage_rows_are_chunk_aligned(height, chunk, world):
    spans = [chunk_rows(height, chunk, r, world) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == height
    for (_, b), (c, _) in zip(spans, spans[1:], strict=False):
        assert b == c
    assert all(a % chunk == 0 for a, b in spans if b > a)  # empty shares may sit anywhere


def test_exchange_plan_moves_only_what_changed_owner():
    moves = exchange_plan([(0, 100), (100, 200)], [(0, 90), (90, 200)])
    assert moves == [(0, 1, (90, 100))]
    # a rank with nothing now, large shifts, and a rank that ends up empty
    moves = exchange_plan([(0, 50), (50, 50), (50, 200)], [(0, 0), (0, 120), (120, 200)])
    assert sorted(moves) == [(0, 1, (0, 50)), (2, 1, (50, 120))]


def test_exchange_plan_refuses_holes_and_overlaps():
    with pytest.raises(RuntimeError, match="needs rows"):
        exchange_plan([(0, 50), (60, 100)], [(0, 100), (100, 100)])
    with pytest.raises(RuntimeError, match="overlap"):
        exchange_plan([(0, 60), (50, 100)], [(0, 50), (50, 100)])


# -- the exchange over real processes ------------------------------------------------------
def _stress_regroup(height: int, width: int) -> None:
    """Random targets (uneven, empty, far jumps); each round every owner rewrites its rows."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    topo = DistTopology(rank, world)
    rng = np.random.default_rng(7)  # the same targets on every rank
    cuts = lambda: np.sort(rng.integers(0, height + 1, size=world - 1))  # noqa: E731
    bounds = [0, *cuts(), height]
    y0, y1 = int(bounds[rank]), int(bounds[rank + 1])
    band = topo.allocate(height, width, y0, y1, reserve=(y0, min(y1 + 8, height)))
    band.data[:] = torch.arange(y0, y1, dtype=torch.float32).reshape(1, -1, 1)
    for version in range(1, 25):
        bounds = [0, *cuts(), height]
        band = topo.regroup(band, int(bounds[rank]), int(bounds[rank + 1]))
        want = torch.arange(band.y0, band.y1, dtype=torch.float32) + 1000 * (version - 1)
        assert torch.equal(band.data[0, :, 0], want), (rank, version)
        band.data += 1000  # a stale copy of these rows anywhere would now be wrong
    assert topo.stats["steps"] == 24


def test_regroup_random_layouts_three_ranks():
    from accelerate import debug_launcher

    debug_launcher(_stress_regroup, args=(97, 5), num_processes=3)


# -- end to end: same bytes for 1, 2, 3 workers --------------------------------------------
def _sample(out, workers, **kw):
    opts = dict(size="192x160", steps=4, threads=1, device="cpu", batch=3, checkpoint_every=2)
    opts.update(kw)
    return api.sample(out, workers=workers, **opts)


def test_tiny_unet_same_bytes_for_1_2_3_workers(tmp_path, tiny_model):
    ref = tmp_path / "w1.zarr"
    _sample(ref, 1, model=str(tiny_model))
    for n in (2, 3):
        s = _sample(tmp_path / f"w{n}.zarr", n, model=str(tiny_model))
        assert s["workers"] == n and s["exchange"]["bytes_per_step"] > 0
        same_store(ref, tmp_path / f"w{n}.zarr")


def test_gaussian_same_bytes_cli(tmp_path):
    args = ["sample", "--model", "gaussian", "--patch", "32", "--size", "224", "--steps", "3",
            "--device", "cpu"]
    for n in (1, 2):
        out = str(tmp_path / f"{n}.zarr")
        r = runner.invoke(app, [*args, "--workers", str(n), "-o", out, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["width"] == 224
    same_store(tmp_path / "1.zarr", tmp_path / "2.zarr")


# -- options and faults --------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--workers", "0"], ["--gpus", "0"], ["--count", "0"],
                                  ["--gpus", "1", "--device", "cpu"],
                                  ["--gpus", "2", "--workers", "3"]])
def test_bad_worker_options_are_usage_errors(tmp_path, args):
    r = runner.invoke(app, ["sample", "--model", "gaussian", "--patch", "32", "--size", "64",
                            "-o", str(tmp_path / "x.zarr"), *args])
    assert r.exit_code == 2, r.output
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="needs fewer than 64 GPUs")
def test_more_gpus_than_devices_fails_before_work(tmp_path):
    r = runner.invoke(app, ["sample", "--model", "gaussian", "--patch", "32", "--size", "64",
                            "--gpus", "64", "-o", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and "CUDA device" in r.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_joined_job_with_other_worker_count_is_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="WORLD_SIZE=4"):
        api.sample(tmp_path / "x.zarr", 64, workers=2, model="gaussian", patch=32)


@pytest.mark.parametrize("fault", ["chunk-row:1", "state-chunk:1"])
def test_dead_worker_is_named_and_store_resumes(tmp_path, monkeypatch, fault):
    gauss = dict(model="gaussian", patch=32, size="600x544")  # rank 1 writes the 2nd chunk row
    ref = tmp_path / "ref.zarr"
    _sample(ref, 1, **gauss)
    out = tmp_path / "x.zarr"
    monkeypatch.setenv("WSIGEN_FAULT", fault)
    monkeypatch.setenv("WSIGEN_FAULT_RANK", "1")
    with pytest.raises(WsigenError, match=r"worker rank 1 of 2 was killed by SIGKILL.*resum") as e:
        _sample(out, 2, **gauss)
    assert e.value.exit_code == 1
    monkeypatch.delenv("WSIGEN_FAULT")
    assert not zarr.open_group(str(out), mode="r").attrs["wsigen"]["complete"]
    api.sample(out, workers=3, device="cpu", resume=True)  # any number of workers
    same_store(ref, out)


# -- many slides ---------------------------------------------------------------------------
def test_count_writes_slides_and_manifest_and_resumes(tmp_path, monkeypatch):
    opts = dict(model="gaussian", patch=32, size=96, steps=3, threads=1, device="cpu", seed=5)
    root = tmp_path / "set"
    monkeypatch.setenv("WSIGEN_FAULT", "stage:2")  # the 2nd stage a process completes
    monkeypatch.setenv("WSIGEN_FAULT_RANK", "1")
    with pytest.raises(WsigenError, match="rank 1"):
        api.sample(root, workers=2, count=3, **opts)
    monkeypatch.delenv("WSIGEN_FAULT")
    m = json.loads((root / "manifest.json").read_text())
    assert [s["seed"] for s in m["slides"]] == [5, 6, 7] and not m["complete"]
    assert m["slides"][1]["status"] == "partial"  # rank 1's slide, killed after its 2nd stage
    s = api.sample(root, workers=2, resume=True, device="cpu")
    assert s["complete"] and s["count"] == 3
    m = json.loads((root / "manifest.json").read_text())
    assert m["complete"] and {x["status"] for x in m["slides"]} == {"complete"}
    # whole slides and bands give the same slide as one process with that seed
    one = tmp_path / "one.zarr"
    api.sample(one, workers=1, **{**opts, "seed": 7})
    same_store(one, root / "slide-7.zarr")


def test_count_whole_slides_then_bands_match_one_process(tmp_path):
    opts = dict(model="gaussian", patch=32, size=96, steps=3, threads=1, device="cpu", seed=1)
    s = api.sample(tmp_path / "w", workers=2, count=3, **opts)  # small: 2 whole, 1 in bands
    assert (s["split"], s["whole"], s["banded"]) == ("slide", 2, 1)
    b = api.sample(tmp_path / "b", workers=2, count=2, split="band", **opts)
    assert (b["whole"], b["banded"]) == (0, 2)
    api.sample(tmp_path / "one", workers=1, count=3, **opts)
    for seed in (1, 2, 3):
        same_store(tmp_path / "one" / f"slide-{seed}.zarr", tmp_path / "w" / f"slide-{seed}.zarr")
    for seed in (1, 2):
        same_store(tmp_path / "one" / f"slide-{seed}.zarr", tmp_path / "b" / f"slide-{seed}.zarr")


def test_plan_line_gives_state_bytes_per_rank():
    spec = RunSpec("unused", Request.of("4096", model="gaussian", patch=64, steps=8))
    line = plan_line(spec, 4)
    assert "4 workers" in line and "rank 3" in line
    # a band is about H/R + M rows of W × 3 float32: (1024 + 64) × 4096 × 12 B ≈ 51 MiB
    band = float(line.split("rank 0 ")[1].split(" MiB")[0])
    assert 45 < band <= 51


# -- an external launcher ------------------------------------------------------------------
def test_torchrun_job_joins(tmp_path):
    """Under torchrun (WORLD_SIZE set) the command is one rank of that job, not a launcher."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "WSIGEN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    args = ["sample", "--model", "gaussian", "--patch", "32", "--size", "128", "--steps", "3",
            "--device", "cpu", "--threads", "1"]
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", WSIGEN, *args,
                        "-o", str(tmp_path / "t.zarr"), "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["workers"] == 2  # one summary, from rank 0
    api.sample(tmp_path / "one.zarr", 128, workers=1, model="gaussian", patch=32, steps=3,
                  device="cpu", threads=1)
    same_store(tmp_path / "one.zarr", tmp_path / "t.zarr")


@pytest.mark.parametrize("sig,code", [("INT", 130), ("TERM", 143)])
def test_signal_to_one_worker_stops_all_at_one_step_and_resumes(tmp_path, sig, code):
    """A signal finishes the step on every rank, saves the state there, exits 130/143."""
    env = {**os.environ, "WSIGEN_NO_PROGRESS": "1", "WSIGEN_FAULT": f"step:5:{sig}",
           "WSIGEN_FAULT_RANK": "1"}
    args = ["sample", "--model", "gaussian", "--patch", "32", "--size", "96", "--steps", "6",
            "--device", "cpu", "--threads", "1"]
    r = subprocess.run([WSIGEN, *args, "--workers", "2", "-o", str(tmp_path / "s.zarr")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and "--resume -o" in r.stderr.splitlines()[-1]
    info = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["wsigen"]
    assert info["state"] == {"stage": 0, "step": 5}  # rank 1's 5th step, saved by both ranks
    api.sample(tmp_path / "s.zarr", workers=3, device="cpu", resume=True)
    api.sample(tmp_path / "one.zarr", 96, workers=1, model="gaussian", patch=32, steps=6,
                  device="cpu", threads=1)
    same_store(tmp_path / "one.zarr", tmp_path / "s.zarr")
