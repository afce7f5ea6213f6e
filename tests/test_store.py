"""The slide store (design.md §4 "Store"): layout, NGFF metadata, integer pyramid, whole chunks,
completion only after every chunk exists, mid-stage state, info."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsigen.errors import WsigenError
from wsigen.slides import pyramid
from wsigen.slides import store as st
from wsigen.slides.store import SlideStore, downsample2, level_shapes

BG = (242, 240, 244)
SHA = "5a" * 32


def tissue(y0: int, y1: int, width: int, seed: int = 0) -> np.ndarray:
    """Tissue-like (3, y1 − y0, width) uint8: H&E pinks and purples with texture on near-white glass."""
    yy, xx = np.mgrid[y0:y1, 0:width].astype(np.float32)
    mask = (np.sin(xx / 97 + 1.3 * np.sin(yy / 131)) + np.cos(yy / 83 - 0.7 * np.sin(xx / 59))) > -0.3
    t = 0.5 + 0.25 * np.sin(xx / 7.3) * np.cos(yy / 5.1) + 0.25 * np.sin((xx + yy) / 11.7)
    pink, purple = np.array([230, 150, 190], np.float32), np.array([120, 60, 150], np.float32)
    rgb = pink[:, None, None] * (1 - t) + purple[:, None, None] * t
    rgb = np.where(mask, rgb, np.array(BG, np.float32)[:, None, None])
    rgb += np.random.default_rng([seed, y0]).normal(0, 2, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def tissue_mask(level: np.ndarray) -> np.ndarray:
    """(3, H, W) → (H, W) bool: pixels that are not glass."""
    return np.abs(level.astype(int) - np.array(BG)[:, None, None]).max(axis=0) > 12


def make_info(seed: int = 0, mpp: float = 0.5) -> dict:
    return {"torch_version": "test", "config": {"steps": 4, "guided_steps": 3, "seed": seed},
            "key": {"seed": seed}, "model": {"name": "synthetic", "sha256": SHA},
            "seed": seed, "mpp_per_stage": [mpp]}


def make_store(path, height: int, width: int, *, chunk: int = 256, min_side: int = 256,
               mpp: float = 0.5, seed: int = 0, finalize: bool = True) -> SlideStore:
    """A one-stage store of tissue-like pixels written chunk row by chunk row (no sampling)."""
    s = SlideStore.create(path, stages=[{"index": 0, "height": height, "width": width, "mpp": mpp,
                                         "path": "0"}], final=(height, width),
                          info=make_info(seed, mpp), chunk=chunk, overwrite=True)
    c = s.stage_array(0).chunks[1]
    for y in range(0, height, c):
        s.write_rows(0, y, tissue(y, min(y + c, height), width, seed))
    s.mark_stage_complete(0)
    if finalize:
        s.finalize(mpp, "synthetic", min_side=min_side)
    return s


def arrays(path) -> dict[str, np.ndarray]:
    """Every array of a store by path, decoded."""
    g = zarr.open_group(str(path), mode="r")
    out = {}

    def walk(grp, prefix=""):
        for name, a in grp.arrays():
            out[prefix + name] = np.asarray(a[:])
        for name, sub in grp.groups():
            walk(sub, prefix + name + "/")

    walk(g)
    return out


# -- pure helpers --------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, min_side, expected", [
    (1024, 1024, 1024, [(1024, 1024)]),
    (1100, 1536, 1024, [(1100, 1536), (550, 768)]),
    (1300, 1000, 256, [(1300, 1000), (650, 500), (325, 250), (163, 125)]),
    (5, 3, 1, [(5, 3), (3, 2), (2, 1), (1, 1)]),
])
def test_level_shapes(h, w, min_side, expected):
    assert level_shapes(h, w, min_side) == expected


@pytest.mark.parametrize("shape", [(3, 4, 6), (3, 5, 7), (3, 1, 1), (3, 2, 9)])
def test_downsample2_is_integer_mean_rounding_half_up(shape):
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    got = downsample2(a)
    p = np.pad(a, ((0, 0), (0, shape[1] % 2), (0, shape[2] % 2)), mode="edge").astype(np.int64)
    total = p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2]
    assert got.dtype == np.uint8
    assert np.array_equal(got, np.floor(total / 4 + 0.5).astype(np.uint8))


# -- layout and metadata -------------------------------------------------------------------------
def test_pyramid_levels_are_2x2_means_of_the_level_above(tmp_path):
    s = make_store(tmp_path / "s.zarr", 1300, 1000, chunk=256, min_side=256)
    assert s.complete and s.level_names() == ["0", "1", "2", "3"]
    levels = [np.asarray(s.level_array(i)[:]) for i in range(4)]
    assert [lv.shape[1:] for lv in levels] == level_shapes(1300, 1000, 256)
    for i in range(1, 4):
        assert np.array_equal(levels[i], downsample2(levels[i - 1])), i
    written = np.concatenate([tissue(y, min(y + 256, 1300), 1000) for y in range(0, 1300, 256)], axis=1)
    assert np.array_equal(levels[0], written)
    for i in range(4):
        assert s.missing_chunks(str(i)) == 0


def test_ngff_metadata_validates_with_ome_zarr_models(tmp_path):
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.image import Image

    s = make_store(tmp_path / "s.zarr", 1300, 1000, min_side=256, mpp=0.25)
    g = zarr.open_group(str(s.path), mode="r")
    img = Image.from_zarr(g)
    assert isinstance(open_ome_zarr(g), Image)
    ms = img.ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["c", "y", "x"]
    assert [a.unit for a in ms.axes[1:]] == ["micrometer", "micrometer"]
    for i, ds in enumerate(ms.datasets):
        assert ds.path == str(i)
        assert list(ds.coordinateTransformations[0].scale) == [1.0, 0.25 * 2**i, 0.25 * 2**i]
        a = g[ds.path]
        c = min(256, max(a.shape[1:]))
        assert a.dtype == np.uint8 and a.shape[0] == 3 and a.chunks == (3, c, c)


def test_sampled_store_layout_and_provenance(tmp_path):
    from wsigen import api

    out = tmp_path / "g.zarr"
    r = api.sample(out, "160x96", model="gaussian", patch=32, steps=3, device="cpu", threads=1, seed=7)
    s = SlideStore.open(out)
    i = s.info
    for key in ("version", "torch_version", "config", "key", "model_sha256", "seed", "mpp_per_stage",
                "stages_complete", "complete"):
        assert key in i, key
    assert i["synthetic"] is True and i["complete"] is True and i["seed"] == 7
    assert i["model_sha256"] == r["model_sha256"] == i["model"]["sha256"]
    assert i["stages_complete"] == list(range(r["stages"]))
    assert i["mpp_per_stage"] == r["mpp_per_stage"] and i["state"] is None
    assert i["config"]["width"] == 160 and i["key"]["seed"] == 7
    # Level 0 is the last stage's output; earlier stages are under stages/ with their canvases.
    assert s.stage_name(r["L"]) == "0" and s.level_array(0).shape == (3, 96, 160)
    for stage in i["stages"][:-1]:
        assert s.group[f"stages/{stage['index']}"].shape == (3, stage["height"], stage["width"])
    assert "state" not in s.group
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(str(out), mode="r"))


def test_drop_stages_removes_intermediate_stages(tmp_path):
    from wsigen import api

    out = tmp_path / "d.zarr"
    api.sample(out, "128x64", model="gaussian", patch=32, steps=3, device="cpu", threads=1,
               drop_stages=True)
    s = SlideStore.open(out)
    assert s.complete and s.info["stages_dropped"] is True
    assert "stages" not in s.group and not (out / "stages").exists()
    assert s.level_array(0).shape == (3, 64, 128)
    d = s.describe()
    assert [x["present"] for x in d["stages"]] == [False] * (len(d["stages"]) - 1) + [True]


def test_empty_chunks_are_stored(tmp_path):
    """All-zero chunks are written too, so 'every chunk exists' can be checked by listing."""
    s = SlideStore.create(tmp_path / "z.zarr", stages=[{"index": 0, "height": 64, "width": 64,
                                                        "mpp": 1.0, "path": "0"}],
                          final=(64, 64), info=make_info(), chunk=32)
    assert s.missing_chunks("0") == 4
    s.write_rows(0, 0, np.zeros((3, 64, 64), np.uint8))
    assert s.missing_chunks("0") == 0
    assert SlideStore.open(s.path, "r+").missing_chunks("0") == 0


def test_write_rows_must_be_whole_chunk_rows(tmp_path):
    s = SlideStore.create(tmp_path / "a.zarr", stages=[{"index": 0, "height": 100, "width": 64,
                                                        "mpp": 1.0, "path": "0"}],
                          final=(100, 64), info=make_info(), chunk=32)
    s.write_rows(0, 96, np.ones((3, 4, 64), np.uint8))  # the short last chunk row
    s.write_rows(0, 32, np.ones((3, 64, 64), np.uint8))  # two chunk rows at once
    for y0, shape in [(16, (3, 16, 64)), (0, (3, 20, 64)), (0, (3, 32, 60)), (64, (3, 64, 64))]:
        with pytest.raises(ValueError):
            s.write_rows(0, y0, np.ones(shape, np.uint8))


def test_create_requires_provenance_and_refuses_foreign_output(tmp_path):
    stages = [{"index": 0, "height": 8, "width": 8, "mpp": 1.0, "path": "0"}]
    with pytest.raises(ValueError, match="seed"):
        SlideStore.create(tmp_path / "a.zarr", stages=stages, final=(8, 8),
                          info={k: v for k, v in make_info().items() if k != "seed"})
    (tmp_path / "b.zarr").mkdir()
    (tmp_path / "b.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(WsigenError, match="not a wsigen store"):
        SlideStore.create(tmp_path / "b.zarr", stages=stages, final=(8, 8), info=make_info(),
                          overwrite=True)
    with pytest.raises(WsigenError, match="exists"):
        SlideStore.create(tmp_path / "b.zarr", stages=stages, final=(8, 8), info=make_info())
    assert (tmp_path / "b.zarr" / "notes.txt").read_text() == "mine"


def test_open_refuses_what_is_not_a_slide_store(tmp_path):
    with pytest.raises(WsigenError, match="not found"):
        SlideStore.open(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(WsigenError, match="not a wsigen slide store"):
        SlideStore.open(tmp_path / "plain.zarr")
    (tmp_path / "dir").mkdir()
    with pytest.raises(WsigenError, match="not a zarr v3 store"):
        SlideStore.open(tmp_path / "dir")


@pytest.mark.parametrize("change, problem", [
    ({"stages": "../../etc/passwd"}, "stages is not a list"),
    ({"stages": [{"index": 0, "height": -1, "width": 8, "mpp": 1.0}]}, "stage 0 is malformed"),
    ({"stages_complete": "all"}, "stages_complete"),
    ({"complete": "yes"}, "complete is not"),
    ({"state": {"stage": "x"}}, "state is malformed"),
])
def test_damaged_attributes_are_one_clear_error(tmp_path, change, problem):
    s = make_store(tmp_path / "d.zarr", 64, 64, chunk=64, finalize=False)
    s.update_info(**change)
    with pytest.raises(WsigenError, match=f"damaged \\({problem}"):
        SlideStore.open(s.path)


# -- a chunk is written whole or not at all -----------------------------------------------------
def _chunk_file(s: SlideStore) -> Path:
    return s.path / "0" / "c" / "0" / "0" / "0"


@pytest.mark.parametrize("existing", [False, True])
def test_failed_chunk_write_leaves_no_partial_chunk(tmp_path, monkeypatch, existing):
    """The write dies after half the bytes: the key keeps its old bytes (or stays absent)."""
    s = SlideStore.create(tmp_path / "a.zarr", stages=[{"index": 0, "height": 64, "width": 64,
                                                        "mpp": 1.0, "path": "0"}],
                          final=(64, 64), info=make_info(), chunk=64)
    old = tissue(0, 64, 64, seed=1)
    if existing:
        s.write_rows(0, 0, old)
    before = _chunk_file(s).read_bytes() if existing else None
    real_open = Path.open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            view = memoryview(data).cast("B")
            self.f.write(view[: len(view) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def half_open(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return HalfWriter(f) if "w" in mode and self.name.endswith(".partial") else f

    monkeypatch.setattr(Path, "open", half_open)
    with pytest.raises(OSError):
        s.write_rows(0, 0, tissue(0, 64, 64, seed=2))
    monkeypatch.undo()
    assert not list(s.path.rglob("*.partial"))
    if existing:
        assert _chunk_file(s).read_bytes() == before
        assert np.array_equal(SlideStore.open(s.path).read_rows(0, 0, 64), old)
    else:
        assert not _chunk_file(s).exists() and s.missing_chunks("0") == 1


def test_killed_chunk_write_leaves_old_chunk(tmp_path):
    """SIGKILL in the middle of writing a chunk: only a temporary file remains, the chunk is intact;
    finalize removes the leftover."""
    s = make_store(tmp_path / "k.zarr", 64, 64, chunk=64, finalize=False)
    before = _chunk_file(s).read_bytes()
    child = textwrap.dedent(f"""
        import os, signal, numpy as np
        from pathlib import Path
        from wsigen.slides.store import SlideStore
        real_open = Path.open
        class Dying:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *e): self.f.close()
            def write(self, data):
                v = memoryview(data).cast("B")
                self.f.write(v[: len(v) // 2]); self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        def dying_open(self, mode="r", *a, **k):
            f = real_open(self, mode, *a, **k)
            return Dying(f) if "w" in mode and self.name.endswith(".partial") and "/c/" in str(self) else f
        Path.open = dying_open
        s = SlideStore.open({str(s.path)!r}, "r+")
        s.write_rows(0, 0, np.full((3, 64, 64), 7, np.uint8))
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    assert len(list(s.path.rglob("*.partial"))) == 1
    assert _chunk_file(s).read_bytes() == before
    s = SlideStore.open(s.path, "r+")
    assert np.array_equal(s.read_rows(0, 0, 64), tissue(0, 64, 64))
    s.finalize(0.5, "k")
    assert s.complete and not list(s.path.rglob("*.partial"))


# -- complete only after every chunk of every level ----------------------------------------------
def test_interrupted_pyramid_leaves_store_incomplete_then_finalize_completes(tmp_path, monkeypatch):
    s = make_store(tmp_path / "p.zarr", 1300, 1000, finalize=False)
    calls = {"n": 0}
    real = pyramid.downsample2

    def failing(a):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(a)

    monkeypatch.setattr(pyramid, "downsample2", failing)
    with pytest.raises(KeyboardInterrupt):
        s.finalize(0.5, "p", min_side=256, workers=1)
    monkeypatch.undo()
    s = SlideStore.open(s.path, "r+")
    assert not s.complete and "ome" not in s.group.attrs
    s.finalize(0.5, "p", min_side=256)
    ref = make_store(tmp_path / "ref.zarr", 1300, 1000)
    a, b = arrays(s.path), arrays(ref.path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_killed_pyramid_then_finalize_is_byte_identical(tmp_path):
    """WSIGEN_FAULT=pyramid-chunk:N kills finalize midway (a real SIGKILL); finalizing again gives
    the same bytes as an uninterrupted finalize."""
    s = make_store(tmp_path / "p.zarr", 1300, 1000, finalize=False)
    child = (f"from wsigen.slides.store import SlideStore; "
             f"SlideStore.open({str(s.path)!r}, 'r+').finalize(0.5, 'p', min_side=256)")
    env = {**os.environ, "WSIGEN_FAULT": "pyramid-chunk:5"}
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    s = SlideStore.open(s.path, "r+")
    assert not s.complete
    s.finalize(0.5, "p", min_side=256)
    ref = make_store(tmp_path / "ref.zarr", 1300, 1000, finalize=False)
    ref.finalize(0.5, "p", min_side=256)
    assert _files(s.path) == _files(ref.path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_finalize_refuses_missing_chunks_and_incomplete_stages(tmp_path):
    s = make_store(tmp_path / "m.zarr", 512, 512, finalize=False)
    (s.path / "0" / "c" / "0" / "1" / "1").unlink()
    with pytest.raises(WsigenError, match="chunks missing"):
        s.finalize(0.5, "m", min_side=256)
    assert not SlideStore.open(s.path).complete
    t = SlideStore.create(tmp_path / "t.zarr", stages=[{"index": 0, "height": 8, "width": 8, "mpp": 1.0,
                                                        "path": "0"}], final=(8, 8), info=make_info())
    with pytest.raises(WsigenError, match="not complete"):
        t.finalize(1.0, "t")


# -- mid-stage state -----------------------------------------------------------------------------
def test_new_checkpoint_invalidates_the_old_one_before_overwriting(tmp_path):
    s = make_store(tmp_path / "s.zarr", 64, 64, chunk=32, finalize=False)
    x = s.begin_state(1, 64, 64, chunk=32)
    x[:] = np.ones((3, 64, 64), np.float32)
    s.commit_state(1, 10)
    assert s.state_info() == {"stage": 1, "step": 10}
    x = s.begin_state(1, 64, 64, chunk=32)
    assert s.state_info() is None  # a crash while writing step 20 must not resume "step 10"
    assert x.dtype == np.float32 and x.shape == (3, 64, 64)
    x[:, :32] = np.full((3, 32, 64), 2, np.float32)
    s.commit_state(1, 20)
    s.drop_state()
    assert s.state_info() is None and "state" not in s.group


# -- info ----------------------------------------------------------------------------------------
def test_info_reports_incomplete_store_and_how_to_resume(tmp_path):
    s = make_store(tmp_path / "i.zarr", 300, 200, finalize=False)
    d = st.info(s.path)
    assert d["complete"] is False and d["resume"] == f"wsigen sample --resume -o {s.path}"
    assert (d["width"], d["height"], d["mpp"], d["seed"]) == (200, 300, 0.5, 0)
    assert d["model_sha256"] == SHA and d["disk_bytes"] > 0 and d["levels"] == [[300, 200]]
    s.finalize(0.5, "i")
    d = st.info(s.path)
    assert d["complete"] is True and d["resume"] is None
    json.dumps(d)
