"""Inputs with extra planes (issue 17, item 2): pages, Z-stacks, channels stored as pages are refused
with their shape and axes unless ``--page N`` or ``--channels i,j,k`` picks what to read."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from clitools import invoke

from wsigen.errors import UsageError, WsigenError
from wsigen.slides import readers
from wsigen.slides.planes import Planes
from wsigen.slides.store import SlideStore

RES = {"resolution": (1e4 / 2, 1e4 / 2), "resolutionunit": "CENTIMETER"}  # 2 µm/px


def planes_of(n: int, dtype=np.uint8, h: int = 24, w: int = 32) -> np.ndarray:
    """n planes, plane i = a distinct gradient, so a wrong pick shows."""
    rng = np.random.default_rng(n)
    top = np.iinfo(dtype).max
    return rng.integers(0, top, (n, h, w), dtype=dtype, endpoint=True)


def test_five_pages_refused_with_shape_and_axes(tmp_path):
    p = tmp_path / "five.tif"
    tifffile.imwrite(p, np.zeros((5, 128, 128), np.uint8))  # the example: five pages
    want = r"5 planes along axis Q \(shape \(5, 128, 128\), axes QYX\).*--page N.*--channels"
    with pytest.raises(WsigenError, match=want):
        readers.open_image(p, mpp=2)


def test_two_pages_refused_and_page_picks_one(tmp_path):
    a = planes_of(2)
    p = tmp_path / "two.tif"
    tifffile.imwrite(p, a, **RES)
    with pytest.raises(WsigenError, match=r"2 planes along axis Q"):
        readers.open_image(p)
    for n in (0, 1):
        s = readers.open_image(p, planes=Planes.of(page=n))
        np.testing.assert_array_equal(s.read_region(0, 0, 32, 24), np.repeat(a[n][:, :, None], 3, axis=2))
    with pytest.raises(WsigenError, match=r"--page 2 asks for plane 2, but axis Q has 2"):
        readers.open_image(p, planes=Planes.of(page=2))


def test_z_stack_16_bit_channels_pick_three(tmp_path):
    a = planes_of(5, np.uint16)
    p = tmp_path / "z.ome.tif"
    tifffile.imwrite(p, a, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 2.0, "PhysicalSizeY": 2.0})
    with pytest.raises(WsigenError, match=r"5 planes along axis Z \(shape \(5, 24, 32\), axes ZYX\)"):
        readers.open_image(p)
    s = readers.open_image(p, planes=Planes.of(channels="4,0,2"))
    want = np.rint(a[[4, 0, 2]].transpose(1, 2, 0) / 257).astype(np.uint8)  # 16 → 8 bit
    assert np.abs(s.read_region(0, 0, 32, 24).astype(int) - want).max() <= 1
    s = readers.open_image(p, planes=Planes.of(page=3))
    assert np.abs(s.read_region(3, 2, 10, 9)[:, :, 1].astype(int) - np.rint(a[3, 2:11, 3:13] / 257)).max() <= 1


def test_channels_as_pages_and_samples(tmp_path):
    c = planes_of(4)
    p = tmp_path / "c.ome.tif"
    tifffile.imwrite(p, c, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 2.0, "PhysicalSizeY": 2.0})
    with pytest.raises(WsigenError, match="4 planes along axis C"):
        readers.open_image(p)
    s = readers.open_image(p, planes=Planes.of(channels=(2, 1, 3)))
    np.testing.assert_array_equal(s.read_region(0, 0, 32, 24), c[[2, 1, 3]].transpose(1, 2, 0))
    # five samples per pixel (planar): refused, and --channels picks from the samples
    p5 = tmp_path / "s5.tif"
    f = planes_of(5)
    tifffile.imwrite(p5, f, photometric="minisblack", planarconfig="separate", **RES)
    with pytest.raises(WsigenError, match=r"5 channels \(shape \(5, 24, 32\), axes SYX\)"):
        readers.open_image(p5)
    s = readers.open_image(p5, planes=Planes.of(channels="0,4,1"))
    np.testing.assert_array_equal(s.read_region(0, 0, 32, 24), f[[0, 4, 1]].transpose(1, 2, 0))


def test_z_and_channels_together_refused(tmp_path):
    p = tmp_path / "zc.ome.tif"
    tifffile.imwrite(p, np.zeros((2, 3, 16, 16), np.uint8), ome=True, metadata={"axes": "ZCYX"})
    with pytest.raises(WsigenError, match=r"more than one axis .* axes ZCYX"):
        readers.open_image(p, mpp=1, planes=Planes.of(page=0))


def test_grey_alpha_only_where_marked(tmp_path):
    rng = np.random.default_rng(0)
    ga = rng.integers(0, 256, (16, 16, 2), dtype=np.uint8)
    marked = tmp_path / "ga.tif"
    tifffile.imwrite(marked, ga, photometric="minisblack", extrasamples=["unassalpha"], **RES)
    s = readers.open_image(marked).read_region(0, 0, 16, 16)
    al = ga[:, :, 1] / 255
    want = np.rint(ga[:, :, 0] * al + 255 * (1 - al))
    assert np.abs(s[:, :, 0].astype(int) - want).max() <= 1
    unmarked = tmp_path / "g2.tif"
    tifffile.imwrite(unmarked, ga, photometric="minisblack", planarconfig="contig", extrasamples=["unspecified"], **RES)
    with pytest.raises(WsigenError, match="does not mark the second as alpha"):
        readers.open_image(unmarked)
    s = readers.open_image(unmarked, planes=Planes.of(page=1)).read_region(0, 0, 16, 16)
    np.testing.assert_array_equal(s[:, :, 2], ga[:, :, 1])


def test_single_plane_images_unchanged_and_bad_picks(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, rgb, photometric="rgb", **RES)
    np.testing.assert_array_equal(readers.open_image(p).read_region(0, 0, 16, 16), rgb)
    np.testing.assert_array_equal(readers.open_image(p, planes=Planes.of(page=0)).read_region(0, 0, 16, 16), rgb)
    with pytest.raises(WsigenError, match="picks planes it does not have"):
        readers.open_image(tmp_path / "rgb.tif", planes=Planes.of(channels="0,1,5"))
    for bad in ("1,2", "a,b,c", "-1,0,1"):
        with pytest.raises(UsageError):
            Planes.of(channels=bad)
    with pytest.raises(UsageError, match="not both"):
        Planes.of(page=0, channels="0,1,2")


def test_upscale_five_pages_exits_1_and_writes_nothing(tmp_path):
    """The issue's done-when: one line, exit 1, no store and no lock file."""
    five = tmp_path / "five.tif"
    tifffile.imwrite(five, np.zeros((5, 128, 128), np.uint8))
    r = invoke("upscale", five, "--mpp", "2", "--factor", "2", "-o", tmp_path / "u.zarr")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "5 planes along axis Q" in lines[0] and "(5, 128, 128)" in lines[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["five.tif"]


def test_upscale_page_and_channels_store_the_picked_planes(tmp_path):
    a = planes_of(6, h=16, w=16)
    inp = tmp_path / "p.tif"
    tifffile.imwrite(inp, a, **RES)
    common = ["--factor", "2", "--model", "gaussian", "--patch", "16", "--steps", "2", "--device", "cpu"]
    r = invoke("upscale", inp, "-o", tmp_path / "pg.zarr", "--page", "2", *common)
    assert r.exit_code == 0, r.output
    s = SlideStore.open(tmp_path / "pg.zarr")
    np.testing.assert_array_equal(s.read_rows(0, 0, 16), np.repeat(a[2][None], 3, axis=0))
    assert s.info["config"]["input"]["planes"] == {"page": 2}
    r = invoke("upscale", inp, "-o", tmp_path / "ch.zarr", "--channels", "3,1,0", *common)
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(SlideStore.open(tmp_path / "ch.zarr").read_rows(0, 0, 16), a[[3, 1, 0]])


def test_train_and_evaluate_refuse_extra_planes(tmp_path):
    from wsigen.judge.sources import open_slide
    from wsigen.training.data import load_slides

    p = tmp_path / "z.tif"
    tifffile.imwrite(p, planes_of(6), **RES)
    with pytest.raises(WsigenError, match="6 planes along axis Q"):
        load_slides([p])
    with pytest.raises(WsigenError, match="6 planes along axis Q"):
        open_slide(p)
    r = invoke("evaluate", p, "--json")
    assert r.exit_code == 1 and "6 planes along axis Q" in r.stderr


def test_evaluate_and_train_take_the_pick(tmp_path):
    from wsigen.judge.evaluate import Options, _open_all
    from wsigen.training.data import load_slides

    a = planes_of(6, h=64, w=64)
    p = tmp_path / "z.tif"
    tifffile.imwrite(p, a, **RES)
    (s,) = _open_all([p], "reference", Planes.of(channels="5,0,1"))
    np.testing.assert_array_equal(s.read_region(0, 0, 64, 64), a[[5, 0, 1]].transpose(1, 2, 0))
    (d,) = load_slides([p], planes=Planes.of(page=4))
    np.testing.assert_array_equal(d.slide.read_region(0, 0, 8, 8)[:, :, 0], a[4, :8, :8])
    assert Options(planes=Planes.of(page=1)).planes.page == 1
