"""``wsigen preview``: zoom figures and contact sheets from stores, OME-TIFF and SVS, reading little."""

from __future__ import annotations

import numpy as np
import pytest
from clitools import SVS
from clitools import invoke as run
from PIL import Image

from wsigen.judge import drawing, preview, tissue
from wsigen.slides import readers


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from wsigen import api

    out = tmp_path_factory.mktemp("prev") / "g.zarr"
    api.sample(out, 128, model="gaussian", patch=32, steps=3, device="cpu", threads=1, mpp=0.5)
    return out


class CountingSlide(readers.ArraySlide):
    """An in-memory slide that records how many pixels are read from each level."""

    def __init__(self, rgb, mpp):
        super().__init__(rgb, mpp, path="counted.png", min_side=128)
        self.read_px = [0] * len(self.levels)

    def _read(self, level, x, y, w, h):
        self.read_px[level] += w * h
        return super()._read(level, x, y, w, h)


def glass_with_tissue(side=2048, box=(1300, 450, 400, 300)):
    """Near-white glass with one pink-purple tissue region at x, y, w, h (and grey dust elsewhere)."""
    rng = np.random.default_rng(0)
    a = np.full((side, side, 3), 242, np.uint8)
    a[100:140, 100:140] = 120  # grey dust: dark but not stained, so not tissue
    x, y, w, h = box
    a[y : y + h, x : x + w] = rng.integers(0, 40, (h, w, 3)) + np.array([180, 90, 160], np.uint8)
    return a


def test_tissue_mask():
    px = np.array([[[242, 240, 244], [120, 120, 120], [200, 120, 180], [90, 50, 140], [250, 250, 250]]],
                  np.uint8)
    assert tissue.tissue_mask(px).tolist() == [[False, False, True, True, False]]


def test_zoom_panels_follow_tissue_and_read_little():
    slide = CountingSlide(glass_with_tissue(), mpp=0.25)
    panels = preview.zoom_panels(slide, zoom=4, panel=128)
    assert [p.scale for p in panels] == [16, 4, 1]
    for prev, p in zip(panels, panels[1:], strict=False):
        # inside the previous panel's box, and centred on tissue
        assert prev.x <= p.x and p.x + p.w <= prev.x + prev.w + 1e-6
        assert prev.y <= p.y and p.y + p.h <= prev.y + prev.h + 1e-6
        cx, cy = p.x + p.w / 2, p.y + p.h / 2
        assert 1300 <= cx <= 1700 and 450 <= cy <= 750
    assert tissue.tissue_mask(panels[-1].image).mean() > 0.95
    # the whole figure reads about three panels' worth, never a full level-0 image
    assert slide.read_px[0] <= 1.2 * 128 * 128
    assert sum(slide.read_px) < 0.05 * 2048 * 2048


def test_zoom_centre_and_small_slides():
    slide = readers.ArraySlide(glass_with_tissue(1000, (0, 0, 200, 200)), mpp=1.0)
    panels = preview.zoom_panels(slide, zoom=4, panel=256, centre=(900, 900))
    assert panels[-1].scale == 1 and panels[-1].x + panels[-1].w == 1000  # clamped inside the slide
    tiny = readers.ArraySlide(np.full((100, 80, 3), 200, np.uint8), mpp=1.0)
    assert len(preview.zoom_panels(tiny, panel=256)) == 1


def test_nice_lengths():
    assert [drawing.nice_length(v) for v in (0.7, 3, 9.9, 140, 2600)] == [0.5, 2, 5, 100, 2000]
    assert drawing.format_um(2000) == "2 mm" and drawing.format_um(50) == "50 µm"


def test_preview_store_figure(store, tmp_path):
    out = tmp_path / "fig.png"
    r = run("preview", store, "-o", out, "--panel", "64", "--json")
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.mode == "RGB" and img.width > 2 * 64
    assert run("preview", store, "-o", out).exit_code == 1  # exists
    assert run("preview", store, "-o", out, "--overwrite", "--zoom", "2", "--panel", "64").exit_code == 0
    r = run("preview", store, "-o", out, "--overwrite", "--panel", "64", "--colours", "64")
    assert r.exit_code == 0 and Image.open(out).mode == "P"  # a palette PNG: small files for docs
    r = run("preview", store, "-o", tmp_path / "f.jpg", "--colours", "64")
    assert r.exit_code == 2 and "PNG" in r.stderr


def test_preview_grid_on_ome_tiff(tmp_path):
    import tifffile

    rgb = np.asarray(readers.open_image(SVS).read_region(0, 0, 1024, 1024))
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.5,
                                                             "PhysicalSizeY": 0.5})
    slide = preview.open_slide(path)
    assert slide.mpp == pytest.approx(0.5)
    out = tmp_path / "grid.png"
    r = run("preview", path, "-o", out, "--grid", "4", "--mpp", "1", "--size", "64")
    assert r.exit_code == 0, r.output
    assert Image.open(out).width >= 2 * 64


def test_preview_svs_and_tiff_resolution(tmp_path):
    out = tmp_path / "svs.jpg"
    assert run("preview", SVS, "-o", out, "--panel", "128").exit_code == 0
    assert Image.open(out).format == "JPEG"
    # a plain TIFF with its resolution in the TIFF tags
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), resolution=(1e4 / 2.0, 1e4 / 2.0),
                     resolutionunit="CENTIMETER", photometric="rgb")
    assert preview.open_slide(path).mpp == pytest.approx(2.0)


@pytest.mark.parametrize("args, code, text", [
    (["--grid", "4"], 2, "--grid needs --mpp"),
    (["--grid", "4", "--mpp", "0.1"], 2, "finer than"),
    (["--grid", "4", "--mpp", "50"], 2, "does not fit"),
    (["--mpp", "1"], 2, "--grid only"),
    (["--centre", "a,b"], 2, "--centre"),
])
def test_preview_usage_errors(store, tmp_path, args, code, text):
    r = run("preview", store, "-o", tmp_path / "x.png", *args)
    assert r.exit_code == code and text in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_preview_refuses_incomplete_store_and_bad_suffix(store, tmp_path):
    import shutil

    from wsigen.slides.store import SlideStore

    bad = tmp_path / "i.zarr"
    shutil.copytree(store, bad)
    SlideStore.open(bad, mode="r+").update_info(complete=False)
    r = run("preview", bad, "-o", tmp_path / "x.png")
    assert r.exit_code == 1 and "not complete" in r.stderr
    r = run("preview", store, "-o", tmp_path / "x.bmp")
    assert r.exit_code == 2 and "format" in r.stderr
