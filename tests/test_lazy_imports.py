"""Sampling needs no codec or slide-reading library (a GPU machine may lack them): with
imagecodecs, pyvips, openslide, wsidicom, pydicom and matplotlib made unimportable, `sample`,
`sample --resume`, `info` and `plan` still work; an export then says what is missing."""

import subprocess
import sys

import pytest

BLOCKER = '''
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Block())
'''
BLOCKED = {"imagecodecs", "pyvips", "openslide", "wsidicom", "pydicom", "matplotlib"}


@pytest.fixture
def blocked_env(tmp_path):
    import os
    from pathlib import Path

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(BLOCKED=sorted(BLOCKED)))
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{root}", "WSIGEN_NO_PROGRESS": "1"}


def _wsigen(env, *args):
    return subprocess.run([sys.executable, "-c", "from wsigen.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=180)


def test_the_blocker_blocks(blocked_env):
    r = subprocess.run([sys.executable, "-c", "import imagecodecs"], capture_output=True, text=True,
                       env=blocked_env)
    assert r.returncode != 0 and "blocked by the test" in r.stderr


def test_sampling_needs_no_codec_library(blocked_env, tmp_path, tiny_model):
    out = tmp_path / "s.zarr"
    r = _wsigen(blocked_env, "sample", "--model", tiny_model, "--size", "64", "--steps", "3", "-o", out,
                "--threads", "1")
    assert r.returncode == 0, r.stderr
    for args in (["info", out], ["plan", "--model", tiny_model, "--size", "256"],
                 ["sample", "--model", "gaussian", "--patch", "32", "--size", "64", "--steps", "3",
                  "-o", tmp_path / "g.zarr", "--workers", "2", "--device", "cpu"]):
        r = _wsigen(blocked_env, *args)
        assert r.returncode == 0, (args, r.stderr)
    r = _wsigen(blocked_env, "export", out, "--format", "tiff", "-o", tmp_path / "s.tif")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "needs the Python package 'imagecodecs'" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "s.tif").exists()
