"""Planning counts agree with design.md §3 and with what the sampler actually does."""

from wsigen import api
from wsigen.method import planning


def test_counts_match_design_table_shape():
    c = planning.count(4096, 4096, 512, 2, 0.5, steps=40, seed=0)
    assert c["L"] == 3
    # design.md §3 assumes every step shifted: 1 + 9 + 25 + 81 = 116 diffusions, 116 × 79 evals.
    per_stage = [s["patches_per_step"] for s in c["stages"]]
    assert per_stage == [1, 9, 25, 81]
    assert c["evaluations"] <= 116 * 79 and c["evaluations"] > 0.97 * 116 * 79


def test_counts_equal_sampler_evaluations(tmp_path):
    s = api.sample(tmp_path / "g.zarr", "96x160", model="gaussian", patch=32, steps=5, seed=3,
                   device="cpu", skip_background=False)
    c = planning.count(96, 160, 32, 2, s["mpp"], steps=5, seed=3)
    assert c["evaluations"] == s["evaluations"] and c["patch_steps"] == s["patches"]


def test_plan_cli_json_and_estimate():
    import json

    from typer.testing import CliRunner

    from wsigen.cli.app import app

    r = CliRunner().invoke(app, ["plan", "--size", "65536", "--gpus", "4", "--model", "gaussian",
                                 "--patch", "512", "--throughput", "40", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["L"] == 7 and p["processes"] == 4
    assert abs(p["evaluations"] - 1_766_440) < 0.001 * 1_766_440  # design.md §3
    assert p["estimated_seconds"] == p["evaluations"] / 160
    # a quarter of the 51.5 GB float32 state per process, plus the rows a shift can move in
    assert 12.8e9 < p["memory_per_process"]["state"] < 13.5e9
    r = CliRunner().invoke(app, ["plan", "--size", "512", "--model", "gaussian", "--patch", "64"])
    assert r.exit_code == 0 and "no time estimate" in r.stdout
