"""Export (design.md §4 "Export"): every level of every format reads back equal to the store's
(exactly when lossless; tile by tile equal to an independent JPEG encode otherwise), with µm/px
and the synthetic marker, model hash and seed; tiles stream in bounded memory."""

from __future__ import annotations

import json
import math
import tracemalloc
import xml.etree.ElementTree as ET

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile
from test_store import SHA, make_store, tissue_mask
from typer.testing import CliRunner

import wsigen
from wsigen.cli.app import app
from wsigen.errors import UsageError, WsigenError
from wsigen.slides.export_tiles import Codec, chunk_reader, encoded_tiles
from wsigen.slides.export_vips import write_png
from wsigen.slides.exporting import export

SUFFIX = {"ome-tiff": ".ome.tif", "tiff": ".tif", "svs": ".svs", "dzi": ".dzi", "png": ".png"}
MPP, SEED, TILE = 0.25, 5, 256
runner = CliRunner()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def tissue_psnr(decoded: np.ndarray, level: np.ndarray) -> float:
    m = tissue_mask(level.transpose(2, 0, 1))
    assert m.mean() > 0.3  # the synthetic slide is mostly tissue
    return psnr(decoded[m], level[m])


def tiff_levels(t: tifffile.TiffFile) -> list:
    """The first page of each pyramid level (OME SubIFDs, or directories; SVS without thumbnail)."""
    return [lv.pages[0] for lv in t.series[0].levels]


def openslide_levels(path) -> list[np.ndarray]:
    with openslide.OpenSlide(str(path)) as o:
        out = []
        for i, (w, h) in enumerate(o.level_dimensions):
            rgba = np.asarray(o.read_region((0, 0), i, (w, h)))
            assert (rgba[..., 3] == 255).all()
            out.append(rgba[..., :3])
        return out


# -- TIFF family: lossless ------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["none", "deflate", "zstd"])
@pytest.mark.parametrize("fmt", ["ome-tiff", "tiff", "svs"])
def test_lossless_levels_read_back_exactly(slide, levels, tmp_path, fmt, compression):
    out = tmp_path / f"x{SUFFIX[fmt]}"
    r = export(slide.path, out, format=fmt, compression=compression, tile=TILE)
    assert r["levels"] == 4 and r["bytes"] == out.stat().st_size
    with tifffile.TiffFile(out) as t:
        assert (t.is_ome, t.is_svs, t.is_bigtiff) == (fmt == "ome-tiff", fmt == "svs", fmt == "ome-tiff")
        if fmt == "ome-tiff":
            assert len(t.pages) == 1 and len(t.pages[0].subifds) == 3  # the pyramid is in SubIFDs
        pages = tiff_levels(t)
        assert len(pages) == 4
        for i, p in enumerate(pages):
            assert p.is_tiled and (p.tilelength, p.tilewidth) == (TILE, TILE)
            assert p.photometric == tifffile.PHOTOMETRIC.RGB
            assert np.array_equal(p.asarray(), levels[i]), i
            # µm/px in the resolution tags (pixels per cm)
            assert p.tags["ResolutionUnit"].value == 3
            xres = p.tags["XResolution"].value
            assert xres[0] / xres[1] == pytest.approx(1e4 / (MPP * 1000 / p.shape[1]))
    if fmt != "ome-tiff":
        got = openslide_levels(out)
        assert len(got) == 4
        for i, a in enumerate(got):
            assert np.array_equal(a, levels[i]), i


# -- TIFF family: JPEG ----------------------------------------------------------------------------
@pytest.mark.parametrize("quality, subsampling", [(90, (1, 1)), (75, (2, 2))])
@pytest.mark.parametrize("fmt", ["ome-tiff", "tiff", "svs"])
def test_jpeg_tiles_equal_an_independent_encode(slide, levels, tmp_path, fmt, quality, subsampling):
    out = tmp_path / f"j{SUFFIX[fmt]}"
    export(slide.path, out, format=fmt, compression="jpeg", quality=quality, tile=TILE)
    with tifffile.TiffFile(out) as t:
        fh = t.filehandle
        for i, p in enumerate(tiff_levels(t)):
            assert p.compression == tifffile.COMPRESSION.JPEG
            assert p.photometric == tifffile.PHOTOMETRIC.YCBCR
            assert tuple(p.tags["YCbCrSubSampling"].value) == subsampling
            lv = levels[i]
            across = -(-lv.shape[1] // TILE)
            for k, (off, n) in enumerate(zip(p.dataoffsets, p.databytecounts, strict=True)):
                fh.seek(off)
                raw = fh.read(n)
                ty, tx = divmod(k, across)
                px = lv[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE]
                px = np.pad(px, ((0, TILE - px.shape[0]), (0, TILE - px.shape[1]), (0, 0)), mode="edge")
                ref = imagecodecs.jpeg8_encode(px, level=quality, colorspace="RGB",
                                               outcolorspace="YCBCR", subsampling=subsampling)
                assert np.array_equal(imagecodecs.jpeg8_decode(raw), imagecodecs.jpeg8_decode(ref)), (i, k)
            decoded = p.asarray()
            if quality == 90:
                assert tissue_psnr(decoded, lv) >= 30, i
    if fmt != "ome-tiff" and quality == 90:
        for i, a in enumerate(openslide_levels(out)):
            assert tissue_psnr(a, levels[i]) >= 30, i


# -- metadata -------------------------------------------------------------------------------------
def test_ome_xml_validates_and_records_provenance(slide, tmp_path):
    from ome_types import from_xml

    out = tmp_path / "m.ome.tif"
    export(slide.path, out, format="ome-tiff", tile=TILE)
    with tifffile.TiffFile(out) as t:
        xml = t.ome_metadata
        assert t.pages[0].description.startswith("<?xml")
    try:
        import xmlschema  # noqa: F401  (ome-types validates against the XSD with it)

        validate = True
    except ImportError:  # pragma: no cover - then only the model-level checks below run
        validate = False
    ome = from_xml(xml, validate=validate)
    img = ome.images[0]
    px = img.pixels
    assert (px.size_x, px.size_y, px.size_c, px.type.value) == (1000, 1300, 3, "uint8")
    assert px.physical_size_x == px.physical_size_y == MPP
    assert px.physical_size_x_unit.value == "µm" and px.channels[0].samples_per_pixel == 3
    assert "Synthetic" in img.description and SHA in img.description
    m = ome.structured_annotations.map_annotations[0].value
    kv = {e.k: e.value for e in m.ms}
    assert kv["synthetic"] == "true" and kv["model_sha256"] == SHA and kv["seed"] == str(SEED)
    assert img.annotation_refs[0].id == ome.structured_annotations.map_annotations[0].id


@pytest.mark.skipif(not any(__import__("importlib").util.find_spec(m) for m in ("xmlschema", "lxml")),
                    reason="ome-types needs xmlschema or lxml to validate against the OME XSD")
def test_ome_xml_schema_validation_is_active(slide, tmp_path):
    from ome_types import from_xml

    out = tmp_path / "v.ome.tif"
    export(slide.path, out, format="ome-tiff", tile=TILE)
    with tifffile.TiffFile(out) as t:
        xml = t.ome_metadata
    from_xml(xml, validate=True)
    broken = xml.replace('SizeC="3"', 'SizeC="three"')
    with pytest.raises(Exception):  # noqa: B017  (xmlschema's or pydantic's error)
        from_xml(broken, validate=True)


def test_svs_is_aperio_for_openslide(slide, tmp_path):
    out = tmp_path / "a.svs"
    export(slide.path, out, format="svs", tile=TILE)
    with openslide.OpenSlide(str(out)) as o:
        p = o.properties
        assert p["openslide.vendor"] == "aperio"
        assert float(p["openslide.mpp-x"]) == float(p["openslide.mpp-y"]) == MPP
        assert float(p["openslide.objective-power"]) == 40  # 20× ≈ 0.5 µm/px
        assert p["aperio.Synthetic"] == "true" and p["aperio.ModelSHA256"] == SHA
        assert p["aperio.Seed"] == str(SEED)
        assert p["tiff.ImageDescription"].startswith("Aperio")
        assert "thumbnail" in o.associated_images and o.level_count == 4


def test_generic_tiff_for_openslide(slide, tmp_path):
    out = tmp_path / "g.tif"
    export(slide.path, out, format="tiff", compression="deflate", tile=TILE)
    with openslide.OpenSlide(str(out)) as o:
        p = o.properties
        assert p["openslide.vendor"] == "generic-tiff" and o.level_count == 4
        assert float(p["openslide.mpp-x"]) == pytest.approx(MPP)
        desc = p["tiff.ImageDescription"]
        meta = json.loads(desc[desc.index("{"):])
        assert meta["synthetic"] is True and meta["model_sha256"] == SHA and meta["seed"] == SEED


def test_level_and_max_size_choose_the_base(slide, levels, tmp_path):
    from ome_types import from_xml

    out = tmp_path / "l1.ome.tif"
    r = export(slide.path, out, format="ome-tiff", compression="zstd", level=1, tile=TILE)
    assert (r["level"], r["levels"], r["mpp"]) == (1, 3, 2 * MPP)
    with tifffile.TiffFile(out) as t:
        assert [p.shape for p in tiff_levels(t)] == [lv.shape for lv in levels[1:]]
        assert np.array_equal(t.series[0].levels[0].asarray(), levels[1])
        assert from_xml(t.ome_metadata).images[0].pixels.physical_size_x == 2 * MPP
    r = export(slide.path, tmp_path / "m.tif", format="tiff", compression="none", max_size=400, tile=TILE)
    assert (r["level"], r["width"], r["height"]) == (2, 250, 325)
    with pytest.raises(UsageError, match="level"):
        export(slide.path, tmp_path / "n.tif", format="tiff", level=4)
    with pytest.raises(UsageError, match="no level fits"):
        export(slide.path, tmp_path / "n.tif", format="tiff", max_size=100)


# -- PNG and Deep Zoom ----------------------------------------------------------------------------
def png_read(path):
    import pyvips

    im = pyvips.Image.new_from_file(str(path))
    a = np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8, shape=(im.height, im.width, im.bands))
    return a, {f: im.get(f) for f in im.get_fields() if f.startswith("png-comment") or f == "xres"}


def test_png_level_pixels_and_metadata(slide, levels, tmp_path):
    r = export(slide.path, tmp_path / "p.png", format="png", max_size=700)
    assert (r["level"], r["width"], r["height"]) == (1, 500, 650)
    a, meta = png_read(tmp_path / "p.png")
    assert np.array_equal(a, levels[1])
    text = {k.split("-", 3)[3]: v for k, v in meta.items() if k.startswith("png-comment")}
    w = json.loads(text["wsigen"])
    assert w["synthetic"] is True and w["model_sha256"] == SHA and w["seed"] == SEED
    assert (w["level"], w["mpp"], w["width"]) == (1, 2 * MPP, 500)
    assert meta["xres"] == pytest.approx(1e3 / (2 * MPP))  # pixels per mm
    r = export(slide.path, tmp_path / "q.png", format="png")  # default: largest ≤ 4096 px
    assert r["level"] == 0


def test_png_of_a_large_level_goes_through_a_temporary_tiff(slide, levels, tmp_path):
    write_png(tmp_path / "big.png", slide.level_array(0), MPP, {"synthetic": True}, small_bytes=0)
    assert np.array_equal(png_read(tmp_path / "big.png")[0], levels[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]  # temporary files removed


@pytest.mark.parametrize("compression", ["none", "jpeg"])
def test_dzi_pyramid(slide, levels, tmp_path, compression):
    import pyvips

    r = export(slide.path, tmp_path / "d.dzi", format="dzi", compression=compression, tile=TILE)
    dzi, files = tmp_path / "d.dzi", tmp_path / "d_files"
    assert r["output"] == str(dzi) and dzi.is_file() and files.is_dir()
    root = ET.parse(dzi).getroot()
    ext = "png" if compression == "none" else "jpeg"
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == (str(TILE), "0", ext)
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (size.get("Width"), size.get("Height")) == ("1000", "1300")
    top = math.ceil(math.log2(1300))
    assert sorted(int(p.name) for p in files.iterdir() if p.is_dir()) == list(range(top + 1))
    rows = []
    for ty in range(-(-1300 // TILE)):
        row = []
        for tx in range(-(-1000 // TILE)):
            im = pyvips.Image.new_from_file(str(files / str(top) / f"{tx}_{ty}.{ext}"))
            row.append(np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8,
                                  shape=(im.height, im.width, im.bands))[..., :3])
        rows.append(np.concatenate(row, axis=1))
    full = np.concatenate(rows, axis=0)
    if compression == "none":
        assert np.array_equal(full, levels[0])
    else:
        assert tissue_psnr(full, levels[0]) >= 30
    meta = json.loads((files / "wsigen.json").read_text())
    assert meta["synthetic"] is True and meta["model_sha256"] == SHA and meta["seed"] == SEED
    assert (meta["mpp"], meta["width"], meta["height"], meta["level"]) == (MPP, 1000, 1300, 0)


# -- refusals -------------------------------------------------------------------------------------
def test_incomplete_store_is_refused_unless_partial(tmp_path):
    s = make_store(tmp_path / "i.zarr", 300, 200, finalize=False)
    with pytest.raises(WsigenError, match="incomplete.*--resume.*--partial"):
        export(s.path, tmp_path / "i.ome.tif")
    assert not (tmp_path / "i.ome.tif").exists()
    r = export(s.path, tmp_path / "i.ome.tif", partial=True, compression="none", tile=TILE)
    assert r["complete"] is False and r["levels"] == 1
    with tifffile.TiffFile(tmp_path / "i.ome.tif") as t:
        assert "<M K=\"complete\">false</M>" in t.ome_metadata


def test_existing_output_is_refused_without_overwrite(slide, tmp_path):
    out = tmp_path / "e.tif"
    out.write_bytes(b"precious")
    with pytest.raises(WsigenError, match="exists.*--overwrite"):
        export(slide.path, out, format="tiff")
    assert out.read_bytes() == b"precious"
    export(slide.path, out, format="tiff", overwrite=True, tile=TILE)
    assert tifffile.TiffFile(out).pages[0].shape == (1300, 1000, 3)
    (tmp_path / "f_files").mkdir()
    (tmp_path / "f_files" / "mine.txt").write_text("x")
    with pytest.raises(WsigenError, match="not a wsigen export"):
        export(slide.path, tmp_path / "f.dzi", format="dzi", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("kw, match", [
    ({"format": "bmp"}, "--format"), ({"compression": "lzw"}, "--compression"),
    ({"tile": 100}, "--tile"), ({"quality": 0}, "--quality"),
    ({"format": "png", "compression": "jpeg"}, "png"), ({"format": "dzi", "compression": "zstd"}, "dzi"),
])
def test_bad_options(slide, tmp_path, kw, match):
    with pytest.raises(UsageError, match=match):
        export(slide.path, tmp_path / "x", **kw)


# -- streaming ------------------------------------------------------------------------------------
class Recording:
    """A (3, H, W) array that records the slices read from it."""

    def __init__(self, a: np.ndarray, chunks):
        self.a, self.shape, self.chunks, self.reads = a, a.shape, chunks, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.a[key]


@pytest.mark.parametrize("tile, chunk", [(256, 256), (256, 512), (512, 256)])
def test_tiles_stream_band_by_band(levels, tile, chunk):
    lv = np.ascontiguousarray(levels[0].transpose(2, 0, 1))
    arr = Recording(lv, (3, chunk, chunk))
    got = list(encoded_tiles(arr, tile, Codec("none"), workers=2))
    rows = max(tile, chunk)
    assert all(k[1].stop - k[1].start == rows and k[2] == slice(None) for k in arr.reads)
    assert len(arr.reads) == -(-1300 // rows)
    n = 0
    for ty in range(0, 1300, tile):
        for tx in range(0, 1000, tile):
            t = lv[:, ty : ty + tile, tx : tx + tile].transpose(1, 2, 0)
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
            assert got[n] == t.tobytes()
            n += 1
    assert n == len(got)


def test_chunk_files_and_zarr_bands_give_the_same_tiles(slide, levels):
    """Tile = chunk: threads decode chunk files themselves; anything else reads zarr bands."""
    arr = slide.level_array(0)
    assert chunk_reader(arr) is not None
    direct = list(encoded_tiles(arr, TILE, Codec("deflate"), workers=2))
    banded = list(encoded_tiles(Recording(np.asarray(arr[:]), arr.chunks), TILE, Codec("deflate"), 2))
    assert direct == banded


def test_partial_export_of_missing_chunks_gives_the_fill_value(tmp_path):
    s = make_store(tmp_path / "h.zarr", 512, 512, chunk=256, finalize=False)
    (s.path / "0" / "c" / "0" / "1" / "0").unlink()
    ref = np.asarray(s.level_array(0)[:]).transpose(1, 2, 0)  # zarr: fill value where missing
    assert (ref[256:, :256] == 0).all() and ref[:256].any()
    for tile in (256, 128):  # chunk files, then zarr bands
        out = tmp_path / f"h{tile}.tif"
        export(s.path, out, format="tiff", compression="none", tile=tile, partial=True)
        assert np.array_equal(tifffile.imread(out), ref)


def test_export_memory_is_bounded(tmp_path):
    """Peak memory (tracked allocations, modules imported beforehand) stays a small fraction of
    the level (16384 × 512 px): a few 256² tiles in flight per thread."""
    s = make_store(tmp_path / "tall.zarr", 16384, 512, chunk=256, min_side=1024)
    export(s.path, tmp_path / "warm.ome.tif", compression="deflate", level=3)  # imports
    level_bytes = 3 * 16384 * 512
    tracemalloc.start()
    try:
        export(s.path, tmp_path / "t.ome.tif", compression="deflate", tile=256, workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * level_bytes, peak


# -- entry points ---------------------------------------------------------------------------------
def test_wsigen_export_and_info_resolve(slide, tmp_path):
    out = tmp_path / "w.png"
    r = wsigen.export(slide.path, out, format="png", max_size=330)
    assert r["level"] == 2 and out.is_file()
    assert wsigen.info(slide.path)["complete"] is True


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output + (r.stderr or "")
    return r


def test_cli_export_and_info(slide, tmp_path):
    r = cli("export", slide.path, "-o", tmp_path / "c.svs", "--format", "svs", "--tile", "256")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"wrote {tmp_path / 'c.svs'}: svs, 1000x1300 px at 0.25 µm/px, 4 level(s), jpeg q90")
    r = cli("export", slide.path, "-o", tmp_path / "c.svs", "--format", "svs")
    assert r.exit_code == 1 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("export", slide.path, "-o", tmp_path / "d.tif", "--format", "tiff", "--compression",
            "deflate", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["levels"] == 4
    r = cli("export", slide.path, "-o", tmp_path / "x.bmp", "--format", "bmp")
    assert r.exit_code == 2 and "--format" in r.stderr

    r = cli("info", slide.path)
    assert r.exit_code == 0
    assert "complete" in r.stdout and "1000x1300 px at 0.25 µm/px" in r.stdout and SHA in r.stdout
    assert "resume" not in r.stdout
    d = json.loads(cli("info", slide.path, "--json").stdout)
    assert d["levels"] == [[1300, 1000], [650, 500], [325, 250], [163, 125]] and d["seed"] == SEED


def test_cli_info_and_export_of_incomplete_store(tmp_path):
    s = make_store(tmp_path / "i.zarr", 300, 200, finalize=False)
    r = cli("info", s.path)
    assert r.exit_code == 0 and "INCOMPLETE" in r.stdout
    assert f"resume     wsigen sample --resume -o {s.path}" in r.stdout
    r = cli("export", s.path, "-o", tmp_path / "i.tif", "--format", "tiff")
    assert r.exit_code == 1 and "--partial" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("export", s.path, "-o", tmp_path / "i.tif", "--format", "tiff", "--partial")
    assert r.exit_code == 0 and "(partial store)" in r.stdout
    r = cli("info", tmp_path / "nothing.zarr")
    assert r.exit_code == 1 and "not found" in r.stderr


def test_sampled_slide_exports_to_svs(tmp_path):
    from wsigen import api

    out = tmp_path / "g.zarr"
    s = api.sample(out, "128x96", model="gaussian", patch=32, steps=3, device="cpu", threads=1, seed=11,
                   mpp=0.5)
    export(out, tmp_path / "g.svs", format="svs", compression="none", tile=64)
    with openslide.OpenSlide(str(tmp_path / "g.svs")) as o:
        assert o.properties["aperio.Seed"] == "11"
        assert o.properties["aperio.ModelSHA256"] == s["model_sha256"]
        assert float(o.properties["openslide.mpp-x"]) == 0.5
        got = np.asarray(o.read_region((0, 0), 0, (128, 96)))[..., :3]
    import zarr

    assert np.array_equal(got, np.asarray(zarr.open_group(str(out), mode="r")["0"][:]).transpose(1, 2, 0))
