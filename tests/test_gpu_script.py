"""benchmarks/gpu/run.sh --dry-run: the GPU script's sections run on the CPU (the same code at tiny
sizes), each leaving its JSON, so it works before a GPU's minutes are spent on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_sh_dry_run_sections(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run", "env", "sample", "plan"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sections = json.loads((tmp_path / "out" / "sections.json").read_text())
    assert [(s["section"], s["rc"]) for s in sections] == [("env", 0), ("sample", 0), ("plan", 0)]
    sample = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert sample["evaluations"] == sample["plan_evaluations"] > 0 and 0 <= sample["outside_network_share"] < 1
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["throughput_per_gpu"] == sample["evaluations_per_s"]
    assert plan["fast"]["evaluations"] < plan["paper"]["evaluations"]


def test_run_sh_refuses_an_unknown_section(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run", "nope"], capture_output=True,
                       text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert r.returncode == 2 and "unknown argument nope" in r.stderr
