"""Readers: metadata and exact pixels of the bundled SVS, PNG/TIFF/OME-TIFF µm/px, refusals."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from wsigen.errors import WsigenError
from wsigen.slides import readers

DATA = Path(__file__).parent / "data"
SVS = DATA / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def svs():
    with readers.open_image(SVS) as s:
        yield s


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)


def test_svs_metadata(svs):
    assert (svs.width, svs.height) == (2220, 2967)
    assert svs.mpp == pytest.approx(0.499)
    assert svs.levels == [(2220, 2967, 1.0)]
    assert isinstance(svs, readers.OpenSlideSlide)


def test_svs_region_equals_openslide_pixels(svs):
    import openslide

    with openslide.OpenSlide(str(SVS)) as o:
        ref = np.asarray(o.read_region((1000, 1500), 0, (123, 77)))[:, :, :3]
    got = svs.read_region(1000, 1500, 123, 77)
    assert got.dtype == np.uint8 and got.shape == (77, 123, 3)
    np.testing.assert_array_equal(got, ref)
    # the in-memory copy used for training gives the same pixels, and a pyramid
    mem = readers.cached(svs)
    np.testing.assert_array_equal(mem.read_region(1000, 1500, 123, 77), ref)
    assert [d for _, _, d in mem.levels] == [1.0, 2.0, 4.0, 8.0]


def test_region_outside_is_background(svs):
    out = svs.read_region(2200, -10, 40, 20)
    assert (out[:10] == 255).all() and (out[10:, 20:] == 255).all()


def test_read_scaled_is_area_average(svs):
    mem = readers.cached(svs)
    x, y = 400, 600
    block = mem.read_region(x, y, 64, 64).astype(np.float64)
    want = block.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    got = mem.read_scaled(x, y, 64, 64, 16, 16)
    assert np.abs(got - want).max() <= 0.5 + 1e-9  # exact up to rounding to uint8
    # at factor 1 it is the region itself, and a level-2 read agrees with level 0 to rounding
    np.testing.assert_array_equal(
        mem.read_scaled(x, y, 32, 32, 32, 32), mem.read_region(x, y, 32, 32)
    )
    assert mem.best_level(4.5) == 2
    lvl0 = readers.area_resize(mem.read_region(x, y, 512, 512), (0, 0, 512, 512), 64, 64)
    assert np.abs(mem.read_scaled(x, y, 512, 512, 64, 64).astype(int) - lvl0).max() <= 2


def test_area_resize_fractional_box_constant():
    a = np.full((10, 10, 3), 77, np.uint8)
    assert (readers.area_resize(a, (0.3, 1.7, 9.1, 8.2), 5, 3) == 77).all()


def test_png_without_mpp_is_refused(tmp_path, rgb):
    p = tmp_path / "a.png"
    p.write_bytes(imagecodecs.png_encode(rgb))
    with pytest.raises(WsigenError, match="µm"):
        readers.open_image(p)
    s = readers.open_image(p, mpp=0.5)
    assert s.mpp == 0.5 and (s.width, s.height) == (90, 70)
    np.testing.assert_array_equal(s.read_region(5, 6, 30, 20), rgb[6:26, 5:35])
    assert readers.open_image(p, require_mpp=False).mpp is None


@pytest.mark.parametrize("kind", ["grey", "grey16", "rgba", "float"])
def test_png_and_tiff_normalised_to_rgb8(tmp_path, kind):
    rng = np.random.default_rng(1)
    if kind == "grey":
        a = rng.integers(0, 256, (20, 30), dtype=np.uint8)
        want = np.repeat(a[:, :, None], 3, axis=2)
    elif kind == "grey16":
        a = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
        want = np.repeat(np.rint(a[:, :, None] / 257).astype(np.uint8), 3, axis=2)
    elif kind == "rgba":
        a = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
        al = a[:, :, 3:] / 255
        want = np.rint(a[:, :, :3] * al + 255 * (1 - al)).astype(np.uint8)
    else:
        a = rng.random((20, 30, 3)).astype(np.float32)
        want = np.rint(a * 255).astype(np.uint8)
    photometric = "rgb" if a.ndim == 3 else "minisblack"
    extra = {"extrasamples": ["unassalpha"]} if kind == "rgba" else {}
    tifffile.imwrite(
        tmp_path / "a.tif",
        a,
        photometric=photometric,
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
        **extra,
    )
    t = readers.open_image(tmp_path / "a.tif")
    assert t.mpp == pytest.approx(0.25)
    assert np.abs(t.read_region(0, 0, 30, 20).astype(int) - want).max() <= 1
    if kind != "float":
        (tmp_path / "a.png").write_bytes(imagecodecs.png_encode(a))
        s = readers.open_image(tmp_path / "a.png", mpp=1.0)
        assert np.abs(s.read_region(0, 0, 30, 20).astype(int) - want).max() <= 1


def test_tiff_mpp_rules(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "none.tif", rgb)
    with pytest.raises(WsigenError, match="µm"):
        readers.open_image(tmp_path / "none.tif")
    # 72 dpi is a screen default, not a physical scale
    tifffile.imwrite(tmp_path / "dpi.tif", rgb, resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(WsigenError, match="µm"):
        readers.open_image(tmp_path / "dpi.tif")
    tifffile.imwrite(tmp_path / "scan.tif", rgb, resolution=(50800, 50800), resolutionunit="INCH")
    assert readers.open_image(tmp_path / "scan.tif").mpp == pytest.approx(0.5)
    assert readers.open_image(tmp_path / "none.tif", mpp=2.0).mpp == 2.0


def test_ome_tiff_pyramid(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (3, 256, 320), dtype=np.uint8)  # planar CYX
    p = tmp_path / "p.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        tw.write(
            a,
            subifds=1,
            tile=(64, 64),
            metadata={
                "axes": "CYX",
                "PhysicalSizeX": 0.8,
                "PhysicalSizeY": 0.8,
                "PhysicalSizeXUnit": "µm",
            },
        )
        tw.write(a[:, ::2, ::2], subfiletype=1, tile=(64, 64))
    with pytest.raises(WsigenError, match=r"3 planes along axis C \(shape \(3, 256, 320\), axes CYX\)"):
        readers.open_image(p)  # channels stored as pages: which are R, G, B is the user's to say
    s = readers.open_image(p, planes=readers.Planes(channels=(0, 1, 2)))
    assert isinstance(s, readers.TiffSlide)
    assert s.mpp == pytest.approx(0.8)
    assert s.levels == [(320, 256, 1.0), (160, 128, 2.0)]
    hwc = a.transpose(1, 2, 0)
    np.testing.assert_array_equal(s.read_region(33, 17, 50, 40), hwc[17:57, 33:83])
    np.testing.assert_array_equal(
        s.read_region(64, 32, 20, 10, level=1), hwc[::2, ::2][16:26, 32:52]
    )
    assert s.best_level(2.5) == 1
    np.testing.assert_array_equal(
        s.read_scaled(64, 32, 40, 20, 20, 10), hwc[::2, ::2][16:26, 32:52]
    )


def test_ome_physical_size_in_nm(tmp_path, rgb):
    p = tmp_path / "n.ome.tif"
    tifffile.imwrite(
        p,
        rgb,
        metadata={
            "axes": "YXS",
            "PhysicalSizeX": 500,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 500,
            "PhysicalSizeYUnit": "nm",
        },
    )
    assert readers.open_image(p).mpp == pytest.approx(0.5)


def test_five_channels_refused(tmp_path):
    tifffile.imwrite(
        tmp_path / "c5.tif",
        np.zeros((5, 16, 16), np.uint8),
        photometric="minisblack",
        planarconfig="separate",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    with pytest.raises(WsigenError, match="5 channels"):
        readers.open_image(tmp_path / "c5.tif")
    with pytest.raises(WsigenError, match="5 channels"):
        readers.to_rgb8(np.zeros((4, 4, 5), np.uint8))


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.svs", b"", "empty"),
        ("junk.svs", b"not a slide at all" * 100, "cannot read"),
        ("junk.tif", b"II*\x00garbage" * 10, "cannot read"),
        ("junk.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "cannot read"),
    ],
)
def test_unreadable_files(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(WsigenError, match=match):
        readers.open_image(p, mpp=1.0)


def test_missing_and_folders(tmp_path, rgb):
    with pytest.raises(WsigenError, match="not found"):
        readers.open_image(tmp_path / "nope.svs")
    with pytest.raises(WsigenError, match="folder"):
        readers.open_image(tmp_path)
    with pytest.raises(WsigenError, match="no slides"):
        readers.find_images([tmp_path])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(imagecodecs.png_encode(rgb))
    (tmp_path / "a.PNG").write_bytes(imagecodecs.png_encode(rgb))
    (tmp_path / "notes.md").write_text("x")
    assert [p.name for p in readers.find_images([tmp_path])] == ["a.PNG", "b.png"]


def test_thumbnail(svs):
    t = svs.thumbnail(300)
    assert t.shape == (300, round(2220 / 2967 * 300), 3)
