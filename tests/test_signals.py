"""Ctrl-C and SIGTERM stop cleanly: exit 130/143, a resume hint, a store that resumes to the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from clitools import wsigen

ARGS = ["sample", "--model", "gaussian", "--patch", "32", "--size", "96", "--steps", "6", "--seed", "3",
        "--device", "cpu", "--threads", "1"]


def levels(path):
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name]) for name in ("0", "stages/0", "stages/1")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = wsigen(*ARGS, "-o", out)
    assert r.returncode == 0, r.stderr
    return levels(out)


@pytest.mark.parametrize("sig,code", [("INT", 130), ("TERM", 143)])
@pytest.mark.parametrize("nth", [2, 9])  # during stage 0; in the middle of stage 1
def test_signal_stops_cleanly_and_resumes_identically(tmp_path, reference, sig, code, nth):
    out = tmp_path / "s.zarr"
    r = wsigen(*ARGS, "-o", out, fault=f"step:{nth}:{sig}")
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert f"--resume -o {out}" in r.stderr.strip().splitlines()[-1]
    info = zarr.open_group(str(out), mode="r").attrs["wsigen"]
    assert info["complete"] is False
    # the first signal waits for the end of the step and saves the state there
    assert info["state"] is not None and info["state"]["step"] == (nth - 1) % 6 + 1
    r = wsigen("sample", "--resume", "--device", "cpu", "-o", out)
    assert r.returncode == 0, r.stderr
    got = levels(out)
    for name, ref in reference.items():
        assert np.array_equal(got[name], ref), name
