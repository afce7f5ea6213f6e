"""Schedules (run/presets.py, method/schedules.py): relaxation by noise level, part-way starts,
per-stage step counts, DPM-Solver++(2M) with its history, presets — against closed forms, against
today's bytes, and against plan's counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsigen import api
from wsigen.cli.app import app
from wsigen.method import edm, planning, schedules
from wsigen.run.config import Request, SlideConfig, model_config
from wsigen.run.presets import resolve
from wsigen.slides.store import SlideStore

runner = CliRunner()
G = dict(model="gaussian", patch=32, device="cpu", threads=1, seed=3, skip_background=False)


def arrays(path) -> dict[str, np.ndarray]:
    s = SlideStore.open(path)
    n = len(s.info["stages"])
    out = {f"stage {l}": s.read_rows(l, 0, s.stage_array(l).shape[1]) for l in range(n)}
    return out


# -- pure rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, r", [(40, 28), (40, 0), (40, 40), (5, 3), (32, 22)])
def test_sigma_for_index_is_the_index_rule(n, r):
    t = edm.karras_sigmas(edm.Schedule(n))
    s = schedules.sigma_for_index(t, r)
    assert [t[i] >= s for i in range(n)] == [i < r for i in range(n)]


def test_paper_relaxation_interval():
    t = edm.karras_sigmas(edm.Schedule(40))
    assert 0.2555 < t[28] < 0.2557 and 0.3489 < t[27] < 0.3491  # (0.256, 0.349] of the issue, rounded
    assert t[28] < schedules.sigma_for_index(t, 28) <= t[27]


def test_stage_steps_rule():
    # counted from the last stage back; the first value for every earlier guided stage; stage 0: N
    got = [schedules.stage_step_count(40, (40, 32, 24), l, 7) for l in range(8)]
    assert got == [40, 40, 40, 40, 40, 40, 32, 24]
    assert [schedules.stage_step_count(40, (40, 32, 24), l, 1) for l in range(2)] == [40, 24]
    assert [schedules.stage_step_count(12, None, l, 3) for l in range(4)] == [12] * 4


def test_model_r_converted_once_on_its_own_schedule():
    mc = model_config("default")  # records N = 32, r = 22
    own = edm.karras_sigmas(edm.Schedule(mc["steps"]))
    r = resolve(Request.of(start_sigma=3.0), mc)
    assert r.guided_sigma == pytest.approx((own[21] + own[22]) / 2)
    # the same σ_r whatever else changes in the schedule
    assert resolve(Request.of(stage_steps="9,7", steps=50), mc).guided_sigma == r.guided_sigma
    # no new option: today's index rule, today's values
    plain = resolve(Request.of(steps=20), mc)
    assert (plain.guided_sigma, plain.guided_steps) == (None, round(20 * 22 / 32))
    paper = resolve(Request.of(preset="paper"), mc)
    assert (paper.steps, paper.guided_steps, paper.solver, paper.start_sigma) == (40, 28, "heun", None)


# -- bytes ----------------------------------------------------------------------------------
def test_no_new_option_stores_no_new_key(tmp_path):
    api.sample(tmp_path / "a.zarr", "96x64", steps=3, **G)
    info = SlideStore.open(tmp_path / "a.zarr").info
    for k in ("guided_sigma", "start_sigma", "stage_steps", "preset"):
        assert k not in info["config"] and k not in info["key"]
    assert SlideConfig.from_store(info["config"]).settings().for_stage(2, 2).steps == 3


def test_guided_sigma_equal_to_index_rule_gives_the_same_bytes(tmp_path, tiny_model):
    t = edm.karras_sigmas(edm.Schedule(6))
    a = api.sample(tmp_path / "a.zarr", "96x64", model=str(tiny_model), steps=6, guided_steps=4,
                   device="cpu", threads=1, seed=2)
    b = api.sample(tmp_path / "b.zarr", "96x64", model=str(tiny_model), steps=6,
                   guided_sigma=schedules.sigma_for_index(t, 4), device="cpu", threads=1, seed=2)
    assert a["evaluations"] == b["evaluations"]
    for k, v in arrays(tmp_path / "a.zarr").items():
        assert np.array_equal(v, arrays(tmp_path / "b.zarr")[k]), k


@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp2m"])
@pytest.mark.parametrize("start", [None, 1.5])
def test_sigma_zero_pools_to_the_guide(tmp_path, solver, start):
    """σ_r = 0 projects every step: each guided stage's k×k means are its guide (uint8 rounding)."""
    out = tmp_path / "s.zarr"
    api.sample(out, "128x96", steps=5, solver=solver, guided_sigma=0.0, start_sigma=start, **G)
    a = arrays(out)
    for l in range(1, len(a)):
        x = a[f"stage {l}"].astype(np.float64)
        g = a[f"stage {l - 1}"][:, : x.shape[1] // 2, : x.shape[2] // 2].astype(np.float64)
        blocks = x.reshape(3, x.shape[1] // 2, 2, x.shape[2] // 2, 2)
        pooled = blocks.mean(axis=(2, 4))
        unclipped = (blocks.min(axis=(2, 4)) > 0) & (blocks.max(axis=(2, 4)) < 255)
        assert unclipped.sum() > 200  # the Gaussian model at N = 5 clips many blocks; enough remain
        assert np.abs(pooled - g)[unclipped].max() <= 0.5 + 1e-9, (l, solver)


def test_part_way_start_differs_and_counts_fewer_evaluations(tmp_path):
    a = api.sample(tmp_path / "a.zarr", "128x96", steps=6, **G)
    b = api.sample(tmp_path / "b.zarr", "128x96", steps=6, start_sigma=2.0, stage_steps="3", **G)
    assert b["steps_per_stage"] == [6, 3, 3]
    assert b["evaluations"] < a["evaluations"]
    assert not np.array_equal(arrays(tmp_path / "a.zarr")["stage 2"], arrays(tmp_path / "b.zarr")["stage 2"])
    assert np.array_equal(arrays(tmp_path / "a.zarr")["stage 0"], arrays(tmp_path / "b.zarr")["stage 0"])


# -- plan counts equal what a run reports ------------------------------------------------------
@pytest.mark.parametrize("opts", [
    {"steps": 4},
    {"steps": 4, "solver": "dpmpp2m"},
    {"steps": 5, "start_sigma": 3.0, "stage_steps": "4,3"},
    {"steps": 4, "solver": "dpmpp2m", "stage_steps": "2,3", "guided_sigma": 0.5},
    {"preset": "fast"},
])
def test_plan_counts_equal_run(tmp_path, opts):
    s = api.sample(tmp_path / "p.zarr", "160x96", **G, **opts)
    p = api.plan("160x96", model="gaussian", patch=32, seed=3, **opts)
    assert p["evaluations"] == s["evaluations"] and p["patch_steps"] == s["patches"]
    assert [st["steps"] for st in p["stages"]] == s["steps_per_stage"]


def test_fast_preset_meets_the_evaluation_target():
    paper = api.plan("65536", model="gaussian", patch=512, preset="paper")
    fast = api.plan("65536", model="gaussian", patch=512, preset="fast")
    assert paper["evaluations"] == 1_766_384  # the figure
    assert fast["evaluations"] <= 0.35 * paper["evaluations"]
    assert fast["memory_per_process"]["history"] == fast["memory_per_process"]["state"]


def test_dpmpp2m_counts_its_history_in_memory_and_disk():
    h = api.plan("4096", model="gaussian", patch=512, solver="dpmpp2m")
    p = api.plan("4096", model="gaussian", patch=512)
    assert h["memory_per_process"]["total"] == p["memory_per_process"]["total"] + p["memory_per_process"]["state"]
    assert h["disk"]["state"] == 2 * p["disk"]["state"]
    assert planning.count(4096, 4096, 512, 2, 1.0, 40)["evaluations"] == p["evaluations"]


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--start-sigma", "0.001"], "--start-sigma"),
    (["--start-sigma", "0.002"], "--start-sigma"),
    (["--start-sigma", "81"], "--start-sigma"),
    (["--stage-steps", "8,1"], "--stage-steps"),
    (["--stage-steps", "8,x"], "--stage-steps"),
    (["--guided-sigma", "0.3", "--guided-steps", "3"], "exclude"),
    (["--preset", "slow"], "--preset"),
    (["--solver", "rk4"], "--solver"),
])
@pytest.mark.parametrize("cmd", ["sample", "plan"])
def test_bad_schedule_options_are_one_line_usage_errors(tmp_path, args, needle, cmd):
    out = tmp_path / "x.zarr"
    base = ["--model", "gaussian", "--patch", "32", "--size", "64"]
    argv = [cmd, *base, *args] + (["-o", str(out), "--device", "cpu"] if cmd == "sample" else [])
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_resume_refuses_schedule_changes(tmp_path, monkeypatch):
    from clitools import interrupt_at

    out = tmp_path / "r.zarr"
    interrupt_at(monkeypatch, "stage", (1,))
    with pytest.raises(KeyboardInterrupt):
        api.sample(out, "128x96", steps=4, **G)  # an old-style store: no schedule keys
    monkeypatch.undo()
    for extra in (["--start-sigma", "2"], ["--stage-steps", "3"], ["--preset", "paper"],
                  ["--guided-sigma", "0.3"], ["--solver", "dpmpp2m"]):
        r = runner.invoke(app, ["sample", "--resume", "-o", str(out), *extra])
        assert r.exit_code == 2 and "conflict" in r.stderr, (extra, r.output)
    r = runner.invoke(app, ["sample", "--resume", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps_per_stage"] == [4, 4, 4]


def test_cli_fast_preset_runs(tmp_path):
    r = runner.invoke(app, ["sample", "--preset", "fast", "--model", "gaussian", "--patch", "32",
                            "--size", "128", "--device", "cpu", "-o", str(tmp_path / "s.zarr"), "--json"])
    assert r.exit_code == 0, r.output
    info = SlideStore.open(tmp_path / "s.zarr").info
    assert info["config"]["preset"] == "fast" and "preset" not in info["key"]
    assert info["key"]["solver"] == "dpmpp2m" and info["key"]["start_sigma"] == 2.0


def test_dpmpp2m_step_is_first_order_at_both_ends():
    x, u, prev = torch.full((1,), 2.0), torch.full((1,), 0.5), torch.full((1,), 9.0)
    first = schedules.dpmpp2m_update(x, u, None, None, 4.0, 2.0)
    assert first.item() == pytest.approx(0.5 + (2.0 - 0.5) * 0.5)  # Euler: lerp(u, x, t_next/t)
    assert schedules.dpmpp2m_update(x, u, prev, 8.0, 4.0, 0.0).item() == 0.5  # t_N = 0: x = D
    # equal log-steps: D = 1.5·u − 0.5·prev
    mid = schedules.dpmpp2m_update(x, u, prev, 8.0, 4.0, 2.0).item()
    assert mid == pytest.approx(0.5 * 2.0 + 0.5 * (1.5 * 0.5 - 0.5 * 9.0))


def test_dpmpp2m_refused_where_its_history_does_not_fit(tmp_path, monkeypatch):
    """Memory for Heun's state but not for the second band: dpmpp2m is refused, one line, nothing written."""
    from wsigen.errors import WsigenError
    from wsigen.method.stages import plan_stages
    from wsigen.run import preflight

    plans = plan_stages(8192, 8192, 64, 2, 1.0)
    heun = preflight.estimate(plans, 64, 2, 8, 10**6)
    multi = preflight.estimate(plans, 64, 2, 8, 10**6, history=True)
    assert multi.state_per_rank == 2 * heun.state_per_rank
    between = (heun.host_total + multi.host_total) // 2
    preflight.check(heun, tmp_path, memory=between, disk=10**15)
    with pytest.raises(WsigenError, match="not enough memory"):
        preflight.check(multi, tmp_path, memory=between, disk=10**15)
    monkeypatch.setattr(preflight, "available_memory", lambda: between)
    out = tmp_path / "x.zarr"
    r = runner.invoke(app, ["sample", "--model", "gaussian", "--patch", "64", "--size", "8192", "--solver",
                            "dpmpp2m", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 1 and "not enough memory" in r.stderr and not out.exists(), r.output


def test_preset_fills_only_what_was_not_given():
    mc = model_config("default")
    f = resolve(Request.of(preset="fast"), mc)
    assert (f.solver, f.start_sigma, f.stage_steps, f.guided_sigma) == ("dpmpp2m", 2.0, (10, 12), 0.22)
    g = resolve(Request.of(preset="fast", guided_steps=20), mc)  # the user's r, on the plain schedule
    t = edm.karras_sigmas(edm.Schedule(mc["steps"]))
    assert g.guided_sigma == schedules.sigma_for_index(t, 20) and g.guided_steps == 20
    p = resolve(Request.of(preset="paper", guided_sigma=0.5), mc)
    assert p.guided_sigma == 0.5 and p.steps == 40


def test_evaluate_uses_each_stages_own_step_count(tmp_path, monkeypatch):
    from wsigen.judge import metrics, seams

    api.sample(tmp_path / "e.zarr", "128x96", steps=6, start_sigma=2.0, stage_steps="3,4", **G)
    seen = []
    real = metrics.SeamCounter

    def spy(h, w, m, grids, k, levels):
        seen.append(sorted(g for g in grids if g.startswith("step ")))
        return real(h, w, m, grids, k, levels)

    monkeypatch.setattr(metrics, "SeamCounter", spy)
    rows = seams.stage_metrics(SlideStore.open(tmp_path / "e.zarr"))
    assert [len(s) for s in seen] == [3, 4]  # stage 1: 3 steps, stage 2: 4 (not N = 6)
    assert all(r["guide_psnr_db"] for r in rows[1:])
