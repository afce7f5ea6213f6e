"""DICOM export (docs/export.md "DICOM"): the folder opens with wsidicom with every level; levels
read back equal to the store's (exactly for the lossless syntaxes, within a stated PSNR for JPEG);
pixel spacing, size, metadata and UIDs round-trip; dciodvfy accepts every instance; the
Extended Offset Table takes over where 32-bit offsets end; a crash leaves nothing that looks
complete; ``wsigen info`` and ``preview`` read the folder back."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import tracemalloc

import imagecodecs
import numpy as np
import pydicom
import pytest
from clitools import invoke, wsigen
from test_export import psnr, tissue_psnr
from test_store import SHA, make_store
from wsidicom import WsiDicom

from wsigen.errors import UsageError, WsigenError
from wsigen.slides import dicom
from wsigen.slides.dicom_read import dicom_files
from wsigen.slides.dicom_source import padded
from wsigen.slides.exporting import export
from wsigen.slides.readers import open_image

MPP, SEED, ROOT = 0.25, 5, "1.2.826.0.1.3680043.10.999."
#: JPEG baseline q90 (4:2:2) of the tissue-like test slide: PSNR over tissue, every level
#: (38–41 dB on the three larger levels, 34.5 dB on the 163 × 125 one, almost all edges).
JPEG_PSNR_DB = 34.0
DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed; "
                                    "`make install` installs it where apt-get works")


@pytest.fixture(scope="module")
def exported(slide, tmp_path_factory):
    """One export per transfer syntax: {compression: (folder, summary)}."""
    d = tmp_path_factory.mktemp("dicom")
    return {c: (d / c, export(slide.path, d / c, format="dicom", compression=c, tile=256, uid_root=ROOT))
            for c in dicom.SYNTAXES}


def read_levels(folder) -> list[np.ndarray]:
    with WsiDicom.open(folder) as w:
        return [w.read_region((0, 0), lv.level, (lv.size.width, lv.size.height), as_array=True)
                for lv in w.levels]


def datasets(folder) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_files(folder)]


# -- pixels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["jpegls", "jpeg2000"])
def test_lossless_levels_equal_the_store(exported, levels, compression):
    got = read_levels(exported[compression][0])
    assert len(got) == len(levels) == exported[compression][1]["levels"]
    for i, (g, ref) in enumerate(zip(got, levels, strict=True)):
        assert g.shape == ref.shape and np.array_equal(g, ref), f"level {i}"


def test_jpeg_levels_within_the_stated_bound(exported, levels):
    got = read_levels(exported["jpeg"][0])
    assert len(got) == len(levels)
    for i, (g, ref) in enumerate(zip(got, levels, strict=True)):
        assert g.shape == ref.shape
        assert tissue_psnr(g, ref) >= JPEG_PSNR_DB, f"level {i}"
        assert psnr(g, ref) < 60  # it is lossy: the bound is not vacuous


def test_jpeg_frames_equal_an_independent_encode(exported, levels):
    """Each frame is libjpeg-turbo's q90 4:2:2 YCbCr encode of the edge-padded store tile."""
    dss = (pydicom.dcmread(f) for f in dicom_files(exported["jpeg"][0]))
    (ds,) = [d for d in dss if d.TotalPixelMatrixColumns == 500]
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert len(frames) == 2 * 3  # 500 × 650 in 256² tiles
    ref = levels[1].transpose(2, 0, 1)
    for n, frame in enumerate(frames):
        y, x = 256 * (n // 2), 256 * (n % 2)
        tile = padded(ref[:, y : y + 256, x : x + 256], 256)
        mine = imagecodecs.jpeg8_encode(tile, level=90, subsampling="422", outcolorspace="YCBCR")
        assert np.array_equal(imagecodecs.jpeg8_decode(frame), imagecodecs.jpeg8_decode(mine)), n


def test_open_image_reads_regions_in_level_coordinates(exported, levels):
    with open_image(exported["jpegls"][0]) as s:
        assert (s.width, s.height, s.mpp) == (1000, 1300, MPP)
        assert [lv[:2] for lv in s.levels] == [(r.shape[1], r.shape[0]) for r in levels]
        # (x, y) in level-0 pixels, size at the level, as everywhere in wsigen
        assert np.array_equal(s.read_region(200, 100, 90, 70, level=1), levels[1][50:120, 100:190])
        assert np.array_equal(s.read_region(0, 0, 125, 163, level=3), levels[3])


# -- metadata -------------------------------------------------------------------------------------
def test_spacing_size_and_syntax_round_trip(exported, levels):
    syntax = {"jpeg": pydicom.uid.JPEGBaseline8Bit, "jpegls": pydicom.uid.JPEGLSLossless,
              "jpeg2000": pydicom.uid.JPEG2000Lossless}
    for c, (folder, _) in exported.items():
        with WsiDicom.open(folder) as w:
            assert (w.size.width, w.size.height) == (1000, 1300)
            assert float(w.mpp.width) == pytest.approx(MPP) and float(w.mpp.height) == pytest.approx(MPP)
        by_size = {(ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns): ds for ds in datasets(folder)}
        assert sorted(by_size, reverse=True) == [r.shape[:2] for r in levels]
        for (h, w_), ds in by_size.items():
            assert ds.file_meta.TransferSyntaxUID == syntax[c]
            assert ds.DimensionOrganizationType == "TILED_FULL" and ds.Rows == ds.Columns == 256
            sp = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
            # (row, column) spacing in mm: every level covers the same 0.325 × 0.25 mm
            assert sp[0] * h == pytest.approx(1300 * MPP / 1000) and sp[1] * w_ == pytest.approx(1000 * MPP / 1000)
            base = (h, w_) == (1300, 1000)
            assert list(ds.ImageType) == (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if base
                                          else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
            assert ds.LossyImageCompression == ("01" if c == "jpeg" else "00")
        assert json.loads((folder / dicom.MARKER).read_text())["offset_table"] == "bot"


def test_the_series_says_it_is_synthetic(exported):
    folder, _ = exported["jpeg"]
    dss = datasets(folder)
    assert len(dss) == 4
    today = datetime.date.today().strftime("%Y%m%d")
    shared = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PyramidUID")
    for ds in dss:
        assert str(ds.PatientName) == "SYNTHETIC^WSIGEN" and ds.PatientID == "WSIGEN-SYNTHETIC"
        assert not ds.get("PatientBirthDate") and "no patient" in ds.PatientComments
        assert ds.StudyDate == today and ds.StudyTime and "SYNTHETIC" in ds.StudyDescription
        assert ds.Modality == "SM" and ds.OpticalPathSequence[0].OpticalPathIdentifier == "0"
        assert ds.SpecimenDescriptionSequence[0].SpecimenIdentifier == "SYNTHETIC-SAMPLE"
        (eq,) = ds.ContributingEquipmentSequence
        assert f"model sha256 {SHA}" in eq.ContributionDescription and f"seed {SEED}" in eq.ContributionDescription
        uids = [ds.SOPInstanceUID, ds.DimensionOrganizationSequence[0].DimensionOrganizationUID,
                ds.SpecimenDescriptionSequence[0].SpecimenUID] + [ds[k].value for k in shared]
        assert all(str(u).startswith(ROOT) and len(u) <= 64 for u in uids), uids
        assert all(ds[k].value == dss[0][k].value for k in shared)
    assert len({ds.SOPInstanceUID for ds in dss}) == 4
    marker = json.loads((folder / dicom.MARKER).read_text())
    assert marker["synthetic"] is True and marker["model_sha256"] == SHA and marker["uid_root"] == ROOT


def test_default_uid_root_is_uuid_derived(slide, tmp_path):
    export(slide.path, tmp_path / "d", format="dicom", level=3)
    for ds in datasets(tmp_path / "d"):
        assert ds.StudyInstanceUID.startswith("2.25.") and ds.SOPInstanceUID.startswith("2.25.")
        assert int(ds.StudyInstanceUID[5:]) < 2**128


# -- validation -----------------------------------------------------------------------------------
def dciodvfy(path) -> tuple[int, list[str]]:
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return r.returncode, [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


@needs_dciodvfy
@pytest.mark.parametrize("compression", list(dicom.SYNTAXES))
def test_dciodvfy_accepts_every_instance(exported, compression):
    files = dicom_files(exported[compression][0])
    assert len(files) == 4
    for f in files:
        rc, errors = dciodvfy(f)
        assert rc == 0 and not errors, (f.name, errors)


@needs_dciodvfy
def test_dciodvfy_would_see_a_broken_instance(exported, tmp_path):
    """The check above can fail: drop a Type 1 attribute and dciodvfy reports it."""
    ds = pydicom.dcmread(dicom_files(exported["jpeg"][0])[-1])
    del ds.DimensionOrganizationType
    ds.save_as(tmp_path / "broken.dcm")
    _, errors = dciodvfy(tmp_path / "broken.dcm")
    assert any("DimensionOrganizationType" in e for e in errors), errors


# -- offsets past 32 bits ---------------------------------------------------------------------------
@needs_dciodvfy
def test_extended_offset_table_where_32_bits_may_not_do(slide, levels, tmp_path, monkeypatch):
    """A level whose pixel data may pass the Basic Offset Table's 32-bit offsets gets the
    Extended Offset Table (here with the bound lowered; tests/test_dicom.py's slow test crosses
    the real 4 GiB)."""
    monkeypatch.setattr(dicom, "BOT_LIMIT", 1 << 20)
    export(slide.path, tmp_path / "e", format="dicom", compression="jpegls", tile=256)
    assert json.loads((tmp_path / "e" / dicom.MARKER).read_text())["offset_table"] == "eot"
    assert [np.array_equal(g, ref) for g, ref in zip(read_levels(tmp_path / "e"), levels, strict=True)] == [True] * 4
    for f in dicom_files(tmp_path / "e"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds
        rc, errors = dciodvfy(f)
        assert rc == 0 and not errors, errors


class NoiseLevel:
    """A (3, H, W) level of one repeated random tile, to pass 4 GiB of lossless pixel data without
    a store of that size. 7-bit noise: JPEG-LS keeps it at 96 % of raw (full 8-bit noise would
    expand, and CharLS through imagecodecs then fails for want of output buffer)."""

    def __init__(self, height: int, width: int, tile: int):
        self.shape, self.chunks = (3, height, width), (3, tile, tile)
        self.tile = np.random.default_rng(0).integers(0, 128, (3, tile, tile), np.uint8)
        self.frame = imagecodecs.jpegls_encode(np.ascontiguousarray(self.tile.transpose(1, 2, 0)), level=0)

    def __getitem__(self, sel):
        _, ys, xs = sel
        return self.tile[:, : ys.stop - ys.start, : xs.stop - xs.start]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lossless_level_past_4_gib(tmp_path, monkeypatch):
    """One 4.4 GB JPEG-LS instance (368 frames of 2048²): the offsets pass 2^32, and the last
    frame reads back exactly; dciodvfy accepts the file. The frame is encoded once and handed
    to wsidicom as already JPEG-LS (so it copies instead of transcoding 368 times): the write
    path, offset table and folder handling are write_dicom's own."""
    from pydicom.uid import UID, JPEGLSLossless

    from wsigen.slides import dicom_source

    t = 2048
    level = NoiseLevel(16 * t, 23 * t, t)

    class PreEncoded(dicom_source.StoreLevel):
        transfer_syntax = property(lambda self: UID(JPEGLSLossless))

        def get_encoded_tile(self, tile, z, path):
            return level.frame

    monkeypatch.setattr(dicom_source, "StoreLevel", PreEncoded)
    meta = {"model_sha256": SHA, "seed": 0, "model": "noise", "synthetic": True}
    r = dicom.write_dicom(tmp_path / "big", [level], MPP, meta, "noise", "jpegls", 90, t, 2)
    assert r["offset_table"] == "eot" and r["bytes"] > 2**32
    (f,) = dicom_files(tmp_path / "big")
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    offsets = np.frombuffer(ds.ExtendedOffsetTable, "<u8")
    lengths = np.frombuffer(ds.ExtendedOffsetTableLengths, "<u8")
    assert len(offsets) == 368 and offsets[-1] > 2**32 and np.all(np.diff(offsets) > 0)
    assert np.all(lengths >= len(level.frame))  # each frame whole (items are padded to even length)
    with WsiDicom.open(tmp_path / "big") as w:
        last = w.read_region((22 * t, 15 * t), 0, (t, t), as_array=True)
    assert np.array_equal(last, level.tile.transpose(1, 2, 0))
    if DCIODVFY:
        rc, errors = dciodvfy(f)
        assert rc == 0 and not errors, errors


# -- output handling ------------------------------------------------------------------------------
def test_overwrite_rules(slide, tmp_path):
    out = tmp_path / "o"
    export(slide.path, out, format="dicom", level=2)
    with pytest.raises(WsigenError, match="--overwrite"):
        export(slide.path, out, format="dicom", level=2)
    first = {f.name for f in out.iterdir()}
    export(slide.path, out, format="dicom", level=2, overwrite=True)
    assert not first & {f.name for f in out.iterdir() if f.suffix == ".dcm"}  # new instances
    assert not list(tmp_path.glob(".o.*"))  # no temporary folder left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(WsigenError, match="not a wsigen export"):
        export(slide.path, tmp_path / "mine", format="dicom", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("kw, match", [
    ({"compression": "deflate"}, "jpeg, jpeg2000, jpegls"),
    ({"uid_root": "1.2.03."}, "--uid-root"),
    ({"uid_root": "1.2.3"}, "--uid-root"),
    ({"quality": 0}, "--quality"),
    ({"level": 9}, "--level"),
])
def test_bad_options(slide, tmp_path, kw, match):
    with pytest.raises(UsageError, match=match):
        export(slide.path, tmp_path / "x", format="dicom", **kw)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fault", ["export-tile:3", "dicom-marker:1"])
def test_kill_during_export_leaves_no_folder(slide, tmp_path, fault):
    out = tmp_path / "k"
    args = ["export", slide.path, "--format", "dicom", "--tile", "256", "-o", out]
    r = wsigen(*args, fault=fault)
    assert r.returncode == -9, r.stderr
    assert not out.exists(), "a killed export left a folder under the output's name"
    assert all(p.name.startswith(".k.") and p.name.endswith(".partial") for p in tmp_path.iterdir())
    r = wsigen(*args)  # the leftover does not stand in the way
    assert r.returncode == 0, r.stderr
    assert len(read_levels(out)) == 4


def test_disk_full_is_one_line_and_leaves_nothing(slide, tmp_path):
    out = tmp_path / "f"
    r = wsigen("export", slide.path, "--format", "dicom", "--compression", "jpegls", "-o", out, fsize=300_000)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("wsigen: cannot write the DICOM series") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("compression", ["jpeg", "jpegls"])
def test_export_memory_is_bounded(tmp_path, compression):
    """Peak traced memory stays a fraction of the level (16384 × 512 px, 24 MB): tiles in flight,
    also with a codec slower than the reads (dicom_source.TileSlots; without them JPEG-LS peaks
    at the whole level here, 24 MB, with them at 7.5 MB)."""
    s = make_store(tmp_path / "tall.zarr", 16384, 512, chunk=256, min_side=1024)
    export(s.path, tmp_path / "warm", format="dicom", level=3, tile=256)  # imports
    tracemalloc.start()
    try:
        export(s.path, tmp_path / "t", format="dicom", tile=256, workers=2, compression=compression)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.4 * 3 * 16384 * 512, peak


# -- command line ---------------------------------------------------------------------------------
def test_cli_export_info_preview(slide, tmp_path):
    out = tmp_path / "c"
    r = invoke("export", slide.path, "--format", "dicom", "-o", out, "--uid-root", ROOT)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"wrote {out}: dicom, 1000x1300 px at 0.25 µm/px, 4 level(s), jpeg q90")
    r = invoke("info", out)
    assert r.exit_code == 0, r.output
    assert "1000x1300 px at 0.25 µm/px" in r.stdout and "SYNTHETIC^WSIGEN" in r.stdout and SHA in r.stdout
    d = json.loads(invoke("info", out, "--json").stdout)
    assert d["levels"] == [[1300, 1000], [650, 500], [325, 250], [163, 125]] and d["seed"] == str(SEED)
    assert d["synthetic"] is True and d["series_uid"].startswith(ROOT)
    r = invoke("preview", out, "-o", tmp_path / "p.png", "--panel", "128")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").stat().st_size > 0
    r = invoke("export", slide.path, "--format", "dicom", "-o", out)
    assert r.exit_code == 1 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = invoke("export", slide.path, "--format", "dicom", "-o", tmp_path / "y", "--compression", "zstd")
    assert r.exit_code == 2 and "jpeg2000" in r.stderr
