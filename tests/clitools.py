"""Ways tests run the command line: in-process through CliRunner, or as a real subprocess."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from wsigen.cli.app import app

SVS = str(Path(__file__).parent / "data" / "cmu_small_region.svs")
_runner = CliRunner()


def invoke(*args):
    """Run ``wsigen ARGS`` in-process; a traceback in the output fails the test."""
    r = _runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output + (r.stderr or "")
    return r


def wsigen(*args, fault: str | None = None, fsize: int | None = None,
           fault_rank: int | None = None) -> subprocess.CompletedProcess:
    """Run ``wsigen ARGS`` in a fresh process, optionally with a fault point (only on rank
    ``fault_rank`` if given) or a file-size limit."""
    env = {**os.environ, "WSIGEN_NO_PROGRESS": "1"}
    env.pop("WSIGEN_FAULT", None)
    env.pop("WSIGEN_FAULT_RANK", None)
    if fault:
        env["WSIGEN_FAULT"] = fault
    if fault_rank is not None:
        env["WSIGEN_FAULT_RANK"] = str(fault_rank)

    def limit():
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-c", "from wsigen.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=180, preexec_fn=limit)


def interrupt_at(monkeypatch, point: str, detail: tuple):
    """Ctrl-C (KeyboardInterrupt) at the fault point ``point`` whose detail starts with ``detail``,
    in this process; returns the real ``faults.point`` (``monkeypatch.undo()`` restores it)."""
    from wsigen import faults

    real = faults.point

    def interrupt(name, *d):
        if name == point and d[: len(detail)] == detail:
            raise KeyboardInterrupt
        real(name, *d)

    monkeypatch.setattr(faults, "point", interrupt)
    return real
