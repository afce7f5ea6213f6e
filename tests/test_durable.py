"""Durable marks (issue 17, item 3): chunks and their folders are fsynced before the mark that
covers them, zarr.json goes through an fsynced temporary file, a rename and a folder fsync, and a
mark is trusted on resume only where its chunks exist."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clitools import invoke
from test_resume import ARGS, assert_same_store, killed

from wsigen.slides import durable
from wsigen.slides.store import SlideStore


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dref") / "ref.zarr"
    assert invoke("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", "0").exit_code == 0
    return out


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_fsync_order_of_chunks_folders_and_marks(tmp_path, tiny_model, reference, monkeypatch):
    out = (tmp_path / "s.zarr").absolute()
    root_meta = str(out / "zarr.json")
    synced: list[str] = []  # every path fsynced, in order
    events: list[tuple[str, str]] = []
    problems: list[str] = []
    cleared = [0]  # len(synced) when the last checkpoint record was cleared
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        p = _fd_path(fd)
        synced.append(p)
        events.append(("fsync", p))

    def chunks(name: str) -> list[str]:
        base = out / name / "c"
        return sorted(str(f) for f in base.rglob("*") if f.is_file() and not f.name.endswith(".partial"))

    def replace(src, dst, *a, **k):
        src, dst = str(src), str(dst)
        new = json.loads(Path(src).read_text()).get("attributes", {}).get("wsigen") if dst == root_meta else None
        if new is not None:  # (zarr's own first write of the empty group precedes the store's)
            if src not in synced:
                problems.append(f"{src} renamed over zarr.json before it was fsynced")
            old = json.loads(Path(dst).read_text())["attributes"].get("wsigen", {}) if Path(dst).exists() else {}
            for l in set(new.get("stages_complete", [])) - set(old.get("stages_complete", [])):
                name = "0" if l == len(new["stages"]) - 1 else f"stages/{l}"
                files = chunks(name)
                if not files:
                    problems.append(f"stage {l} marked with no chunks")
                dirs = {str(Path(f).parent) for f in files} | {str(out / name / "c" / "0"), str(out / name),
                                                                str(out)}
                late = [f for f in files + sorted(dirs) if f not in synced]
                if late:
                    problems.append(f"stage {l} marked before {late[:3]} were fsynced")
            if new.get("state") and new.get("state") != old.get("state"):
                since = synced[cleared[0]:]
                late = [f for f in chunks("state/x") if f not in since]
                if late or not chunks("state/x"):
                    problems.append(f"state {new['state']} committed before {late[:3]} were fsynced")
            if old.get("state") and not new.get("state"):
                cleared[0] = len(synced)
        real_replace(src, dst, *a, **k)
        events.append(("mark" if new is not None else "replace", dst))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    r = invoke("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", "1")
    monkeypatch.undo()
    assert r.exit_code == 0, r.output
    assert problems == [], "\n".join(problems)
    marks = [i for i, e in enumerate(events) if e == ("mark", root_meta)]
    assert len(marks) > 10  # creation, every stage, every checkpoint, pyramid, complete
    for i in marks:  # the folder is fsynced after each rename of zarr.json, before anything else
        assert events[i + 1] == ("fsync", str(out)), events[i: i + 3]
    assert_same_store(out, reference)  # durability changes no byte


def test_no_fsync_forces_nothing_and_writes_the_same_bytes(tmp_path, tiny_model, reference, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    out = tmp_path / "n.zarr"
    r = invoke("sample", "--model", tiny_model, *ARGS, "-o", out, "--checkpoint-every", "1", "--no-fsync")
    monkeypatch.undo()
    assert r.exit_code == 0, r.output
    assert calls == []
    assert_same_store(out, reference)


def test_write_json_fsyncs_the_temporary_file_before_the_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append(("fsync", _fd_path(fd))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(("replace", str(a))), real_replace(a, b)))
    durable.write_json(tmp_path / "m.json", {"a": 1})
    monkeypatch.undo()
    (k1, tmp), (k2, moved), (k3, folder) = order
    assert (k1, k2, k3) == ("fsync", "replace", "fsync") and tmp == moved and tmp.endswith(".partial")
    assert folder == str(tmp_path) and json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_committed_state_with_a_deleted_chunk_is_refused(tmp_path, tiny_model, reference):
    """Killed after the last stage's checkpoint (step 2): with a chunk of it deleted, zarr would read
    zeros there; the resume refuses the checkpoint and restarts the stage, so the bytes are right."""
    out = tmp_path / "s.zarr"
    r = killed(out, tiny_model, "chunk-row:4", "--checkpoint-every", "2")
    assert r.returncode == -9, r.stderr.decode()
    s = SlideStore.open(out)
    assert s.state_info() == {"stage": 3, "step": 2}
    victim = next(f for f in sorted((out / "state" / "x" / "c").rglob("*")) if f.is_file())
    victim.unlink()
    r = invoke("sample", "--resume", "-o", out)
    assert r.exit_code == 0, r.output
    assert "refusing the checkpoint of stage 3 after step 2: 1 chunks are missing" in r.stderr
    assert_same_store(out, reference)


def test_read_state_refuses_a_missing_chunk(tmp_path, tiny_model):
    import torch

    from wsigen.method.canvas import Band
    from wsigen.run.stageio import read_state

    out = tmp_path / "s.zarr"
    assert killed(out, tiny_model, "chunk-row:4", "--checkpoint-every", "2").returncode == -9
    s = SlideStore.open(out, mode="r+")
    next(f for f in sorted((out / "state" / "x" / "c").rglob("*")) if f.is_file()).unlink()
    band = Band(128, 160, 0, 128, torch.zeros(3, 128, 160))
    with pytest.raises(Exception, match="lacks 1 chunks; refusing to read it as zeros"):
        read_state(s, band)


def test_stage_mark_with_a_missing_chunk_is_sampled_again(tmp_path, tiny_model, reference):
    out = tmp_path / "m.zarr"
    r = killed(out, tiny_model, "stage:3")  # stages 0, 1 and 2 marked complete
    assert r.returncode == -9, r.stderr.decode()
    assert SlideStore.open(out).info["stages_complete"] == [0, 1, 2]
    victim = next(f for f in sorted((out / "stages" / "2" / "c").rglob("*")) if f.is_file())
    victim.unlink()
    r = invoke("sample", "--resume", "-o", out)
    assert r.exit_code == 0, r.output
    assert "stages [2] are marked complete but chunks are missing" in r.stderr
    assert_same_store(out, reference)
