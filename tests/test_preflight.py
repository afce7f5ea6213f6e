"""Pre-flight: memory per process and disk are estimated before anything is written, and a slide
that does not fit is refused with one line naming the numbers and the ways out."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from wsigen.cli.app import app
from wsigen.errors import WsigenError
from wsigen.method import planning
from wsigen.method.stages import plan_stages
from wsigen.run import preflight, session

GB = 10**9
BIG = plan_stages(65536, 65536, 512, 2, 0.5)  # design.md §3: 7 stages, 51.5 GB of state


def needs(plans=BIG, world=1, **kw):
    return preflight.estimate(plans, 512, 2, 8, 50_000_000, world=world, **kw)


def test_state_per_rank_is_a_band_of_the_last_stage():
    one, four = needs(world=1), needs(world=4)
    assert one.state_per_rank == 3 * 65536 * 65536 * 4  # the whole canvas, float32
    assert four.state_per_rank == 3 * (65536 // 4 + 512) * 65536 * 4  # a quarter + shift slack
    assert four.processes_here == 4 and four.host_total == 4 * four.host_per_process
    mem = planning.memory_per_rank(65536, 65536, 512, 2, 4, 8, 50_000_000)
    assert four.state_per_rank == mem["state"] and four.guide_per_rank == mem["guide"]
    assert "state per process: 13.3 GB" in four.state_line() and "1/4" in four.state_line()


def test_accelerator_keeps_model_and_buffers_off_the_host():
    cpu, cuda = needs(device_type="cpu"), needs(device_type="cuda")
    assert cpu.host_per_process - cuda.host_per_process == cpu.buffers + cpu.model


def test_disk_counts_stages_level0_pyramid_and_state():
    n = needs()
    d = n.disk
    assert d["level0"] == 3 * 65536**2 and d["pyramid"] == d["level0"] // 3
    assert d["stages"] == sum(3 * p.height * p.width for p in BIG[:-1])
    assert d["state"] == 4 * d["level0"] and n.disk_needed == d["total"]
    off = needs(checkpoint=False)
    assert off.disk["state"] == 0 and off.disk_needed == d["total"] - d["state"]
    assert needs(on_disk=10 * GB).disk_needed == d["total"] - 10 * GB  # resume: part is written


def test_fits(tmp_path):
    preflight.check(needs(world=8, processes_here=1), tmp_path / "s.zarr", memory=64 * GB, disk=10**13)


def test_memory_refusal_names_numbers_and_ways_out(tmp_path):
    with pytest.raises(WsigenError) as e:
        preflight.check(needs(), tmp_path / "s.zarr", memory=32 * GB, disk=10**13)
    msg = str(e.value)
    assert "\n" not in msg and "not enough memory for 65536x65536 px" in msg
    assert "51.5 GB" in msg and "32.0 GB available" in msg
    assert "--gpus N / --workers N" in msg and "N ≥ 2" in msg and "smaller --size" in msg


def test_disk_refusal_names_numbers_and_ways_out(tmp_path):
    with pytest.raises(WsigenError) as e:
        preflight.check(needs(world=8, processes_here=1), tmp_path / "s.zarr", memory=10**12,
                        disk=50 * GB)
    msg = str(e.value)
    assert "\n" not in msg and f"not enough disk space in {tmp_path}" in msg
    assert "50.0 GB free" in msg and "--checkpoint-every 0" in msg and "needs up to 73.0 GB" in msg
    with pytest.raises(WsigenError) as e:
        preflight.check(needs(world=8, processes_here=1, checkpoint=False), tmp_path / "s.zarr",
                        memory=10**12, disk=5 * GB)
    assert "--checkpoint-every" not in str(e.value)


def test_skip_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("WSIGEN_PREFLIGHT", "0")
    preflight.check(needs(), tmp_path / "s.zarr", memory=1, disk=1)


def test_free_disk_of_a_path_not_yet_created(tmp_path):
    where, free = preflight.free_disk(tmp_path / "a" / "b" / "s.zarr")
    assert where == tmp_path and free > 0


@pytest.mark.parametrize("rank, verdict", [(0, None), (1, 1), (1, 0)])
def test_rank0_decides_for_every_rank(tmp_path, monkeypatch, rank, verdict):
    """Only rank 0 measures; the others follow its broadcast verdict (no rank waits alone)."""
    from wsigen.method.stages import Settings
    from wsigen.run import sampler
    from wsigen.slides import checkpoint

    class Topo(sampler.Topology):
        world = 2

        def broadcast(self, values):
            return values if self.rank == 0 else [verdict]

    topo = Topo()
    topo.rank = rank
    monkeypatch.setattr(preflight, "available_memory", lambda: 10**6 if rank == 0 else 10**15)
    lm = checkpoint.load_model("gaussian", patch=32)
    plans = plan_stages(64, 64, 32, 2, 1.0)
    args = (plans, lm, Settings(), __import__("torch").device("cpu"), topo, tmp_path / "x.zarr", 0, None)
    if rank == 0 or verdict:
        with pytest.raises(WsigenError, match="not enough memory" if rank == 0 else "rank 0"):
            session._preflight(*args)
    else:
        assert session._preflight(*args) is None


def test_sample_refuses_before_writing(tmp_path, monkeypatch):
    """The CLI: exit 1, one line, and no store left behind."""
    monkeypatch.setattr(preflight, "available_memory", lambda: 10**6)
    out = tmp_path / "x.zarr"
    r = CliRunner().invoke(app, ["sample", "--model", "gaussian", "--patch", "32", "--size", "64",
                                 "--steps", "2", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1].startswith("wsigen: not enough memory for 64x64 px")
    assert not out.exists()


def test_state_device_choice():
    """auto puts the band on the GPU only when band + buffers fit in a share of its free memory."""
    from wsigen.errors import UsageError, WsigenError
    from wsigen.run.preflight import DEVICE_STATE_SHARE, state_device

    gib = 2**30
    assert state_device("auto", "cpu", 10 * gib, gib, None) == "cpu"
    assert state_device("auto", "cuda", 10 * gib, gib, 80 * gib) == "cuda"
    fits = int((10 * gib + gib) / DEVICE_STATE_SHARE) + 1
    assert state_device("auto", "cuda", 10 * gib, gib, fits) == "cuda"
    assert state_device("auto", "cuda", 10 * gib, gib, fits - 2 * gib) == "cpu"
    assert state_device("auto", "cuda", 10 * gib, gib, None) == "cpu"  # cannot ask: stay safe
    assert state_device("cpu", "cuda", gib, gib, 80 * gib) == "cpu"
    assert state_device("cuda", "cuda", 50 * gib, gib, 60 * gib) == "cuda"  # asked for, fits
    with pytest.raises(WsigenError, match="GPU has"):
        state_device("cuda", "cuda", 60 * gib, gib, 40 * gib)
    with pytest.raises(UsageError, match="needs --device cuda"):
        state_device("cuda", "cpu", gib, gib, None)
    with pytest.raises(UsageError, match="auto, cpu or cuda"):
        state_device("gpu", "cuda", gib, gib, None)
