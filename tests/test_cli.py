"""The command line through typer's CliRunner: success paths and one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from wsigen.cli.app import app

runner = CliRunner()


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output + (r.stderr or "")
    return r


def test_sample_gaussian_json(tmp_path):
    out = tmp_path / "g.zarr"
    r = run("sample", "--model", "gaussian", "--patch", "32", "--size", "96x64", "--steps", "4",
            "--device", "cpu", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["width"], s["height"], s["L"]) == (96, 64, 2)
    assert s["evaluations"] > 0 and (out / "0" / "zarr.json").exists()


def test_sample_prints_plan_and_summary(tmp_path):
    r = run("sample", "--model", "gaussian", "--patch", "32", "--size", "64", "--steps", "3",
            "--mpp", "0.5", "-o", tmp_path / "a.zarr")
    assert r.exit_code == 0
    assert "L = 1" in r.stderr and "s_0 = 1 µm/px" in r.stderr
    assert r.stdout.startswith("done: 64x64 px at 0.5 µm/px") and "denoiser evaluations" in r.stdout


def test_model_init_info_and_sample(tmp_path):
    m = tmp_path / "tiny.safetensors"
    r = run("model", "init", "--width", "8", "--mults", "1,2", "--patch", "32", "--steps", "3",
            "--guided-steps", "2", "-o", m)
    assert r.exit_code == 0, r.output
    r = run("model", "info", m, "--json")
    cfg = json.loads(r.stdout)["config"]
    assert cfg["patch"] == 32 and cfg["arch"]["width"] == 8 and cfg["steps"] == 3
    r = run("sample", "--model", m, "--size", "64", "-o", tmp_path / "t.zarr")
    assert r.exit_code == 0, r.output
    assert "done:" in r.stdout


@pytest.mark.parametrize("size", ["abc", "0", "-5", "10x", "3x4x5", "0x7"])
def test_bad_size_is_usage_error(tmp_path, size):
    r = run("sample", "--model", "gaussian", "--patch", "32", "--size", size, "-o", tmp_path / "x.zarr")
    assert r.exit_code == 2
    assert "size" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.zarr").exists()


def test_missing_model_file(tmp_path):
    r = run("sample", "--model", tmp_path / "nope.safetensors", "--size", "64", "-o", tmp_path / "x.zarr")
    assert r.exit_code == 1 and "model not found" in r.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_existing_output_needs_overwrite(tmp_path):
    args = ["sample", "--model", "gaussian", "--patch", "32", "--size", "32", "--steps", "2",
            "-o", tmp_path / "x.zarr"]
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    assert run(*args, "--overwrite").exit_code == 0


def test_overwrite_refuses_foreign_directory(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    r = run("sample", "--model", "gaussian", "--patch", "32", "--size", "32", "-o", d, "--overwrite")
    assert r.exit_code == 1 and (d / "precious.txt").exists()


def test_mpp_out_of_model_range(tmp_path, tiny_model):
    # tiny model: trained range 0.25–256 µm/px
    r = run("sample", "--model", tiny_model, "--size", "128", "--mpp", "0.01", "-o", tmp_path / "x.zarr")
    assert r.exit_code == 1 and "0.25" in r.stderr and "µm/px" in r.stderr
    r = run("sample", "--model", tiny_model, "--size", "4096", "--mpp", "200", "-o", tmp_path / "x.zarr")
    assert r.exit_code == 1 and "s_0 = 25600" in r.stderr
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("args", [["--steps", "1"], ["--batch", "0"], ["--seed", "-1"]])
def test_option_ranges_are_usage_errors(tmp_path, args):
    r = run("sample", "--model", "gaussian", "--patch", "32", *args, "-o", tmp_path / "x.zarr")
    assert r.exit_code == 2


def test_guided_steps_above_steps(tmp_path):
    r = run("sample", "--model", "gaussian", "--patch", "32", "--steps", "4", "--guided-steps", "5",
            "-o", tmp_path / "x.zarr")
    assert r.exit_code == 2 and "guided-steps" in r.stderr
