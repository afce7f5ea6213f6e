"""A full disk (EFBIG under a file-size limit, SIGXFSZ ignored): a clear message, nothing that looks
complete, and a store that resumes to the uninterrupted bytes once space is back."""

from __future__ import annotations

import numpy as np
import zarr
from clitools import wsigen

ARGS = ["sample", "--model", "gaussian", "--patch", "32", "--size", "96", "--steps", "4", "--seed", "1",
        "--device", "cpu", "--threads", "1"]


def test_file_size_limit_then_resume(tmp_path):
    ref = tmp_path / "ref.zarr"
    assert wsigen(*ARGS, "-o", ref).returncode == 0
    out = tmp_path / "s.zarr"
    r = wsigen(*ARGS, "-o", out, fsize=12_000)  # stage 2's 96² chunk (≈ 27 kB) cannot be written
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert "write failed" in last and "--resume" in last
    info = zarr.open_group(str(out), mode="r").attrs["wsigen"]
    assert info["complete"] is False and 2 not in info["stages_complete"]
    assert not list(out.rglob("*.partial")), "a partial chunk file was left behind"
    r = wsigen("sample", "--resume", "--device", "cpu", "-o", out)
    assert r.returncode == 0, r.stderr
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("0", "stages/0", "stages/1"):
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name
