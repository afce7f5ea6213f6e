"""One writer per store (issue 17, item 1): the exclusive lock beside the store, what a second writer
and a reader see, and that a killed writer's lock is free at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clitools import invoke
from test_resume import ARGS, assert_same_store

from wsigen.errors import WsigenError
from wsigen.slides import storelock


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    store = tmp_path / "s.zarr"
    with storelock.acquire(store, command="wsigen sample") as held:
        assert held.path == tmp_path / "s.zarr.lock" and held.path.exists()
        with pytest.raises(WsigenError, match=rf"being written by PID {os.getpid()}@{socket.gethostname()} since"):
            storelock.acquire(store)
        holder = storelock.probe(store)
        assert holder is not None and holder.pid == os.getpid() and holder.command == "wsigen sample"
    assert not (tmp_path / "s.zarr.lock").exists()  # removed by the writer when it let go
    assert storelock.probe(store) is None
    storelock.acquire(store).release()  # free again


def test_probe_never_creates_the_lock_file(tmp_path):
    assert storelock.probe(tmp_path / "x.zarr") is None
    assert list(tmp_path.iterdir()) == []


def test_no_lock_takes_nothing(tmp_path):
    with storelock.acquire(tmp_path / "s.zarr"):
        storelock.acquire(tmp_path / "s.zarr", enabled=False).release()  # --no-lock: not refused
    assert list(tmp_path.iterdir()) == []


def test_filesystem_without_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(WsigenError, match="refuses file locks.*--no-lock"):
        storelock.acquire(tmp_path / "s.zarr")


def _holder_process(store: Path) -> subprocess.Popen:
    code = ("import sys, time; from wsigen.slides import storelock; "
            f"storelock.acquire({str(store)!r}); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_killed_writers_lock_is_free_at_once(tmp_path):
    store = tmp_path / "s.zarr"
    p = _holder_process(store)
    try:
        assert storelock.probe(store).pid == p.pid
        with pytest.raises(WsigenError, match=f"PID {p.pid}@"):
            storelock.acquire(store)
    finally:
        p.kill()
        p.wait()
    assert (tmp_path / "s.zarr.lock").exists()  # left behind by the killed writer, but free
    assert storelock.probe(store) is None
    t = time.monotonic()
    storelock.acquire(store).release()
    assert time.monotonic() - t < storelock.RETRY_S


def _wsigen(*args, fault=None) -> subprocess.Popen:
    env = {**os.environ, "WSIGEN_NO_PROGRESS": "1"}
    env.pop("WSIGEN_FAULT", None)
    if fault:
        env["WSIGEN_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-c", "from wsigen.cli import main; main()", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_stopped(p: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{p.pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "T":
            return
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.1)
    raise AssertionError("the writer never reached its stop point")


def test_live_writer_refuses_resume_overwrite_and_fresh_start(tmp_path, tiny_model):
    """A writer paused (SIGSTOP) mid-stage holds the store: ``--resume``, ``--overwrite`` and a
    second fresh start are each refused naming its PID, ``info`` reports it, and once continued
    it finishes with the bytes of an undisturbed run."""
    ref = tmp_path / "ref.zarr"
    assert invoke("sample", "--model", tiny_model, *ARGS, "-o", ref).exit_code == 0
    out = tmp_path / "s.zarr"
    writer = _wsigen("sample", "--model", tiny_model, *ARGS, "-o", out, fault="step:6:STOP")
    try:
        _wait_stopped(writer)
        for extra in (["--resume"], ["--overwrite", "--model", tiny_model, *ARGS], ["--model", tiny_model, *ARGS]):
            r = invoke("sample", "-o", out, *extra)
            assert r.exit_code == 1, (extra, r.output)
            line = r.stderr.strip().splitlines()
            assert len(line) == 1 and f"being written by PID {writer.pid}@" in line[0], (extra, r.stderr)
        assert out.is_dir() and (out / "zarr.json").is_file()  # --overwrite deleted nothing
        d = json.loads(invoke("info", out, "--json").stdout)
        assert d["writer"].startswith(f"PID {writer.pid}@") and d["resume"] is None
        text = invoke("info", out).stdout
        assert f"being written by PID {writer.pid}@" in text
        r = invoke("export", out, "-o", tmp_path / "x.tif")
        assert r.exit_code == 1 and f"being written by PID {writer.pid}@" in r.stderr
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert_same_store(out, ref)
    assert not (tmp_path / "s.zarr.lock").exists()


def test_interrupted_store_says_how_to_resume(tmp_path, tiny_model):
    out = tmp_path / "k.zarr"
    env = {**os.environ, "WSIGEN_FAULT": "stage:1", "WSIGEN_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-c", "from wsigen.cli import main; main()", "sample", "--model",
                        str(tiny_model), *ARGS, "-o", str(out)], env=env, capture_output=True, timeout=300)
    assert r.returncode == -9
    assert storelock.probe(out) is None  # the kernel dropped the killed writer's lock
    text = invoke("info", out).stdout
    assert "INCOMPLETE" in text and "interrupted" in text
    r = invoke("export", out, "-o", tmp_path / "x.tif")
    assert r.exit_code == 1 and f"interrupted: resume with `wsigen sample --resume -o {out}`" in r.stderr
    assert invoke("sample", "--resume", "-o", out).exit_code == 0


def _stopped_child(parent: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text().split(")")[-1].split()
                except OSError:
                    continue
                if stat[0] == "T" and int(stat[1]) == parent:
                    return int(d.name)
        time.sleep(0.2)
    raise AssertionError("no worker reached its stop point")


@pytest.mark.slow
def test_forked_workers_hold_the_launchers_lock(tmp_path, tiny_model):
    """``--workers 2``: the launcher takes the lock, the ranks inherit it; a resume beside them is
    refused naming the launcher."""
    out = tmp_path / "w.zarr"
    env_fault = {"WSIGEN_FAULT_RANK": "1"}
    os.environ.update(env_fault)
    try:
        launcher = _wsigen("sample", "--model", tiny_model, *ARGS, "-o", out, "--workers", "2",
                           fault="step:6:STOP")
    finally:
        os.environ.pop("WSIGEN_FAULT_RANK")
    try:
        rank1 = _stopped_child(launcher.pid)
        r = invoke("sample", "--resume", "-o", out)
        assert r.exit_code == 1 and f"being written by PID {launcher.pid}@" in r.stderr, r.stderr
    finally:
        os.kill(rank1, signal.SIGCONT)
        _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    assert storelock.probe(out) is None


def test_one_lock_for_every_spelling_of_a_path_and_new_folders(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with storelock.acquire(tmp_path / "real" / "s.zarr"):
        with pytest.raises(WsigenError, match="being written by"):
            storelock.acquire(tmp_path / "link" / "s.zarr")
        monkeypatch.chdir(tmp_path / "real")
        with pytest.raises(WsigenError, match="being written by"):
            storelock.acquire("s.zarr")
    storelock.acquire(tmp_path / "new" / "sub" / "s.zarr").release()  # folders made as the store would
    (tmp_path / "file").write_text("x")
    with pytest.raises(WsigenError, match="is not a directory"):
        storelock.acquire(tmp_path / "file" / "s.zarr")


def test_upscale_is_refused_beside_a_writer_and_writes_nothing(tmp_path):
    import numpy as np
    import tifffile

    inp = tmp_path / "in.tif"
    tifffile.imwrite(inp, np.full((16, 16, 3), 200, np.uint8), photometric="rgb")
    out = tmp_path / "u.zarr"
    common = ["--mpp", "2", "--factor", "2", "--model", "gaussian", "--patch", "16", "--steps", "2",
              "--device", "cpu"]
    with storelock.acquire(out, command="wsigen upscale"):
        for extra in ([], ["--overwrite"]):
            r = invoke("upscale", inp, "-o", out, *common, *extra)
            assert r.exit_code == 1 and f"being written by PID {os.getpid()}@" in r.stderr, r.stderr
        assert not out.exists()
    assert invoke("upscale", inp, "-o", out, *common).exit_code == 0
    assert not (tmp_path / "u.zarr.lock").exists()
