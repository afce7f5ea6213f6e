"""SIGKILL in the middle of metadata writes and of an export: nothing looks complete early, and
finishing the work gives the uninterrupted result (chunk kills: tests/test_resume.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from clitools import wsigen

ARGS = ["sample", "--model", "gaussian", "--patch", "32", "--size", "80x64", "--steps", "3", "--seed", "2",
        "--device", "cpu", "--threads", "1"]


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {n: np.asarray(g[n]) for n in ("0", "stages/0", "stages/1")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert wsigen(*ARGS, "-o", out).returncode == 0
    return out


@pytest.mark.parametrize("nth", [1, 2, 3, 4, 5])
def test_kill_during_metadata_then_resume(tmp_path, reference, nth):
    out = tmp_path / "s.zarr"
    r = wsigen(*ARGS, "-o", out, fault=f"metadata:{nth}")
    assert r.returncode == -9, r.stderr  # killed at the chosen metadata write
    info = zarr.open_group(str(out), mode="r").attrs["wsigen"]
    assert info["complete"] is False
    r = wsigen("sample", "--resume", "--device", "cpu", "-o", out)
    assert r.returncode == 0, r.stderr
    assert zarr.open_group(str(out), mode="r").attrs["wsigen"]["complete"] is True
    ref, got = arrays(reference), arrays(out)
    for n in ref:
        assert np.array_equal(ref[n], got[n]), n


@pytest.mark.parametrize("fmt,suffix", [("ome-tiff", ".ome.tif"), ("tiff", ".tif"), ("svs", ".svs")])
def test_kill_during_export_leaves_no_output(tmp_path, reference, fmt, suffix):
    out = tmp_path / f"slide{suffix}"
    args = ["export", reference, "--format", fmt, "--compression", "deflate", "--tile", "16", "-o", out]
    r = wsigen(*args, fault="export-tile:5")
    assert r.returncode == -9
    assert not out.exists(), "a killed export left a file that looks complete"
    assert wsigen(*args).returncode == 0
    with tifffile.TiffFile(out) as tf:
        got = tf.series[0].levels[0].asarray()
    assert np.array_equal(got.transpose(2, 0, 1) if got.shape[-1] == 3 else got, arrays(reference)["0"])
