"""Store I/O beside the compute (wsigen/sampler.py): threaded noise, conversion and chunk writes,
the guide prefetched, and with one process stage l written behind stage l+1. Whatever the
overlap does, the bytes are those of the serial path (``WSIGEN_OVERLAP=0``), a stage is recorded
complete only after all its chunks exist, and a failure in a background write is an error that
resumes to the same bytes."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
import torch
from clitools import wsigen
from test_resume import assert_same_store

from wsigen import api, faults
from wsigen.errors import WsigenError
from wsigen.method import keys
from wsigen.method.canvas import Band, to_uint8
from wsigen.method.cascade import initial_band
from wsigen.method.stages import Settings, StageContext
from wsigen.nets import GaussianDenoiser
from wsigen.run import sampler, stageio
from wsigen.slides.store import SlideStore

# 7 stages; stage 5 (550 × 600) has two chunk rows and is written behind stage 6 (1100 × 1200).
SIZE = "1200x1100"
OPTS = dict(model="gaussian", patch=32, steps=3, seed=5, device="cpu", threads=1)
CLI = ["sample", "--model", "gaussian", "--patch", "32", "--size", SIZE, "--steps", "3", "--seed", "5",
       "--device", "cpu", "--threads", "1"]
BEHIND = 5  # the stage whose writes the tests interfere with


@pytest.fixture(autouse=True)
def _overlap_small_stages(monkeypatch):
    """These canvases are small: overlap every stage, as a large slide does (also in subprocesses)."""
    monkeypatch.setenv("WSIGEN_OVERLAP_MIN_PIXELS", "0")


def sample(out, overlap: bool, workers: str | None = None, **extra):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WSIGEN_OVERLAP", "1" if overlap else "0")
        mp.setenv("WSIGEN_OVERLAP_MIN_PIXELS", "0")  # these canvases are small: overlap every stage
        if workers:
            mp.setenv("WSIGEN_IO_WORKERS", workers)
        return api.sample(out, SIZE, **{**OPTS, "checkpoint_every": 0, **extra})


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The reference: every step serial, guides read back from the store."""
    out = tmp_path_factory.mktemp("serial") / "s.zarr"
    sample(out, overlap=False)
    return out


def test_noise_blocks_agree_with_the_whole_rows():
    full = keys.initial_noise(7, 2, 700, 4500, 37, 600)
    part = keys.initial_noise(7, 2, 700, 4500, 37, 600, 300, 4200)
    assert np.array_equal(part, full[:, :, 300:4200])
    assert keys.initial_noise(7, 2, 700, 4500, 37, 600, 0, 4500).tobytes() == full.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_threaded_noise_fill_is_byte_identical(dtype):
    s = Settings(steps=4, guided_steps=2, state_dtype=dtype).validate()
    ctx = StageContext(GaussianDenoiser(), s, 3, 2, 700, 4500, 1.0, 32, 2, (0.9, 0.9, 0.9),
                       torch.device("cpu"))
    ref = initial_band(ctx, 37, 600)  # one call of keys.initial_noise over the whole band
    for workers in (1, 3):
        band = Band(700, 4500, 37, 600, torch.empty(3, 563, 4500, dtype=s.state_torch_dtype))
        stageio.fill_noise(ctx, band, workers)
        assert torch.equal(band.data, ref.data), workers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blockwise_uint8_conversion_is_to_uint8(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 40, 1500, generator=g) * 2.4 - 1.2).to(dtype)
    x[0, 0, :8] = torch.tensor([-1.0, 1.0, -1.01, 1.01, float("inf"), float("-inf"), 0.0, -0.0])
    x[1, 0, :255] = (torch.arange(255) + 0.5) / 127.5 - 1  # exact halves: round half to even
    out = np.zeros((3, 50, 1500), np.uint8)[:, 5:45]  # a strided destination, as in stage_uint8
    stageio.to_uint8_into(x, out)
    assert np.array_equal(out, to_uint8(x))


def test_blocks_of_a_stage_write_are_whole_chunks(tmp_path, monkeypatch):
    """Blocks of whole chunks in any order give the bytes of whole chunk rows; the fault point
    follows the rows in order."""
    monkeypatch.setattr(stageio, "_WRITE_COLS", 64)
    seen = []
    monkeypatch.setattr(faults, "point", lambda name, *d: seen.append(d[0]) if name == "chunk-row" else None)
    info = {"torch_version": "", "config": {}, "key": {}, "model": {"name": "t"}, "seed": 0, "mpp_per_stage": [1.0]}
    stages = [{"index": 0, "height": 300, "width": 200, "mpp": 1.0}]
    a = SlideStore.create(tmp_path / "a.zarr", stages=stages, final=(300, 200), info=info, chunk=64)
    b = SlideStore.create(tmp_path / "b.zarr", stages=stages, final=(300, 200), info=info, chunk=64)
    data = np.random.default_rng(1).integers(0, 256, (3, 300, 200), dtype=np.uint8)
    for y in range(0, 300, 64):
        a.write_rows(0, y, data[:, y : y + 64])
    w = stageio.WriteBehind(b, 0, data, workers=3)
    w.join()
    assert seen == list(range(0, 300, 64))
    assert np.array_equal(b.read_rows(0, 0, 300), data)
    for f in (tmp_path / "a.zarr" / "0" / "c").rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "b.zarr" / f.relative_to(tmp_path / "a.zarr")).read_bytes()
    with pytest.raises(ValueError, match="columns"):
        b.write_block(0, 0, 32, data[:, :64, 32:96])


@pytest.mark.parametrize("workers", ["1", "3"])
def test_overlapped_run_writes_the_serial_bytes(tmp_path, serial, workers, monkeypatch):
    """Write-behind (guides from memory), threaded writes, and every stage marked complete only
    once all of its chunks exist — even when the background writes are slow."""
    reads, marks = [], []
    real_read, real_mark, real_write = (SlideStore.read_rows, SlideStore.mark_stage_complete,
                                        SlideStore.write_block)

    def read_rows(self, l, y0, y1):
        reads.append(l)
        return real_read(self, l, y0, y1)

    def mark(self, l):
        assert self.missing_chunks(self.stage_name(l)) == 0, f"stage {l} marked before its chunks"
        marks.append(l)
        real_mark(self, l)

    def slow_write(self, l, y0, x0, data, **kw):
        if l == BEHIND:
            threading.Event().wait(0.2)
        real_write(self, l, y0, x0, data, **kw)

    monkeypatch.setattr(SlideStore, "read_rows", read_rows)
    monkeypatch.setattr(SlideStore, "mark_stage_complete", mark)
    monkeypatch.setattr(SlideStore, "write_block", slow_write)
    out = tmp_path / "o.zarr"
    sample(out, overlap=True, workers=workers)
    assert reads == []  # every guide came from the stage written behind
    assert marks == list(range(7))
    assert_same_store(out, serial)


def test_several_processes_prefetch_the_guide_and_write_synchronously(tmp_path, serial, monkeypatch):
    """The path of world > 1 (here one process that calls itself two): no write-behind, the guide
    read in a background thread while the noise is drawn; the same bytes."""

    class Two(sampler.Topology):
        world = 2

    readers, real_read = [], SlideStore.read_rows

    def read_rows(self, l, y0, y1):
        readers.append(threading.current_thread() is threading.main_thread())
        return real_read(self, l, y0, y1)

    monkeypatch.setattr(SlideStore, "read_rows", read_rows)
    out = tmp_path / "t.zarr"
    sample(out, overlap=True, topology=Two())
    assert readers == [False] * 6  # stages 1 … 6, each guide read off the main thread
    assert_same_store(out, serial)


def test_overlap_with_checkpoints_and_serial_resume(tmp_path, serial):
    """Checkpoints in every step (the stage behind is settled before each), interrupted, then
    resumed on the serial path: the same bytes."""
    out = tmp_path / "c.zarr"
    r = wsigen(*CLI, "--checkpoint-every", "1", "-o", out, fault="step:17:INT")  # stage 5, step 2
    assert r.returncode == 130, r.stderr
    s = SlideStore.open(out)
    assert s.state_info() == {"stage": 5, "step": 2} and s.info["stages_complete"] == [0, 1, 2, 3, 4]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WSIGEN_OVERLAP", "0")
        api.sample(out, resume=True, device="cpu")
    assert_same_store(out, serial)


def test_error_in_a_background_write_surfaces_and_resumes(tmp_path, serial, monkeypatch):
    real = SlideStore.write_block

    def full_disk(self, l, y0, x0, data, **kw):
        if l == BEHIND and y0 == 512:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, l, y0, x0, data, **kw)

    monkeypatch.setattr(SlideStore, "write_block", full_disk)
    out = tmp_path / "e.zarr"
    with pytest.raises(OSError) as e:
        sample(out, overlap=True)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(SlideStore, "write_block", real)
    s = SlideStore.open(out)
    assert not s.complete and s.info["stages_complete"] == [0, 1, 2, 3, 4]
    assert not list(out.rglob("*.partial"))
    api.sample(out, resume=True, device="cpu")
    assert_same_store(out, serial)


def test_kill_during_a_background_write_resumes_identically(tmp_path, serial):
    out = tmp_path / "k.zarr"
    r = wsigen(*CLI, "--checkpoint-every", "0", "-o", out, fault="chunk-row:6")  # stage 5's first row
    assert r.returncode == -9, r.stderr
    s = SlideStore.open(out)
    assert not s.complete and BEHIND not in s.info["stages_complete"]
    r = wsigen("sample", "--resume", "--device", "cpu", "-o", out)
    assert r.returncode == 0, r.stderr
    assert_same_store(out, serial)


def test_interrupt_while_writing_behind_cancels_and_resumes(tmp_path, serial, monkeypatch):
    """A hard interrupt in the next stage while the last one is still being written: no more rows
    are submitted, those in flight finish, the stage is not recorded complete."""
    release = threading.Event()
    real_write, real_point = SlideStore.write_block, faults.point

    def held_write(self, l, y0, x0, data, **kw):
        if l == BEHIND:
            assert release.wait(60)
        real_write(self, l, y0, x0, data, **kw)

    def interrupt(name, *detail):
        if name == "step" and detail == (BEHIND + 1, 0):
            release.set()
            raise KeyboardInterrupt
        real_point(name, *detail)

    monkeypatch.setattr(SlideStore, "write_block", held_write)
    monkeypatch.setattr(faults, "point", interrupt)
    out = tmp_path / "i.zarr"
    with pytest.raises(KeyboardInterrupt):
        sample(out, overlap=True, workers="1")
    assert not [t for t in threading.enumerate() if t.name.startswith("wsigen-write")]  # joined
    monkeypatch.undo()
    s = SlideStore.open(out)
    assert s.info["stages_complete"] == [0, 1, 2, 3, 4]
    assert s.missing_chunks(s.stage_name(BEHIND)) == 2  # row 0 was in flight; row 512 (2 chunks) never began
    api.sample(out, resume=True, device="cpu")
    assert_same_store(out, serial)


def test_io_workers_from_the_environment(monkeypatch):
    monkeypatch.setenv("WSIGEN_IO_WORKERS", "3")
    assert stageio.io_workers() == 3
    monkeypatch.setenv("WSIGEN_IO_WORKERS", "0")
    with pytest.raises(WsigenError, match="WSIGEN_IO_WORKERS"):
        stageio.io_workers()
    monkeypatch.setenv("WSIGEN_OVERLAP", "off")
    assert not stageio.overlap_default()


def test_small_stages_run_their_io_serially(tmp_path, serial, monkeypatch):
    """Below WSIGEN_OVERLAP_MIN_PIXELS a stage is written in place and its guide read back."""
    monkeypatch.setenv("WSIGEN_OVERLAP_MIN_PIXELS", str(10**9))
    started = []
    real = stageio.WriteBehind.__init__

    def spy(self, *a, **kw):
        started.append(a[1])
        real(self, *a, **kw)

    monkeypatch.setattr(stageio.WriteBehind, "__init__", spy)
    out = tmp_path / "small.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WSIGEN_OVERLAP", "1")
        api.sample(out, SIZE, **{**OPTS, "checkpoint_every": 0})
    assert started == []
    assert_same_store(out, serial)
    monkeypatch.setenv("WSIGEN_OVERLAP_MIN_PIXELS", "x")
    with pytest.raises(Exception, match="WSIGEN_OVERLAP_MIN_PIXELS"):
        stageio.overlap_min_pixels()
