"""``wsigen evaluate`` per class: a slide of a class is compared with its class's references
(``--reference-labels``), every reference class gets a colour row, and bad combinations are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from clitools import invoke as run
from test_store import make_info

from wsigen.errors import UsageError
from wsigen.judge import evaluate, stains
from wsigen.slides.store import SlideStore

MPP = 0.5
# mean H and E amounts (published Macenko basis) of the two reference classes
AMOUNTS = {"pink": (0.25, 0.9), "purple": (1.1, 0.3)}


def he_image(side: int, cls: str, seed: int) -> np.ndarray:
    """(side, side, 3) uint8 tissue stained by Beer–Lambert with the published H and E vectors,
    amounts uniform within ±40 % of the class's."""
    rng = np.random.default_rng([seed, len(cls)])
    c = np.stack([a * rng.uniform(0.6, 1.4, (side, side)) for a in AMOUNTS[cls]], axis=-1)
    rgb = 240 * np.exp(-c @ stains.REFERENCE.he.T) - 1
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def write_tiff(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e4 / MPP, 1e4 / MPP),
                     resolutionunit="CENTIMETER")
    return path


def write_store(path, rgb, cls: str | None):
    """A finished one-stage store of ``rgb`` whose config records ``cls`` (as ``sample --class`` does)."""
    h, w, _ = rgb.shape
    info = make_info(0, MPP)
    info["config"].update({"mpp": MPP, "grid_shift": True, "class": cls, "guidance": None if cls is None else 1.0})
    s = SlideStore.create(path, stages=[{"index": 0, "height": h, "width": w, "mpp": MPP, "path": "0"}],
                          final=(h, w), info=info, chunk=256, overwrite=True)
    s.write_rows(0, 0, rgb.transpose(2, 0, 1))
    s.mark_stage_complete(0)
    s.finalize(MPP, "synthetic", min_side=256)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    refs = d / "refs"
    for cls in AMOUNTS:
        for i in range(2):
            write_tiff(refs / cls / f"{cls}{i}.tif", he_image(256, cls, 10 + i))
    out = {"dir": d, "refs": refs}
    for cls in AMOUNTS:
        rgb = he_image(256, cls, 99)
        out[cls] = write_store(d / f"{cls}.zarr", rgb, cls)
        out[cls + "-tif"] = write_tiff(d / f"{cls}-export.tif", rgb)
    out["free"] = write_store(d / "free.zarr", he_image(256, "purple", 98), None)
    return out


def opts(**kw):
    return evaluate.Options(patch_size=32, patches=8, mpps=[MPP], **kw)


@pytest.mark.parametrize("cls", sorted(AMOUNTS))
def test_a_class_store_is_compared_with_its_own_class(data, cls):
    other = ({*AMOUNTS} - {cls}).pop()
    r = evaluate.evaluate(data[cls], [data["refs"]], options=opts(reference_labels="folders"))
    assert r["slide"]["class"] == cls
    assert r["references"] == {"slide_class": cls, "class_source": "store", "compared": "class", "n": 2,
                               "total": 4, "labels": "folders", "classes": {"pink": 2, "purple": 2}}
    assert sorted(p.rsplit("/", 2)[1] for p in r["options"]["references"]) == [cls, cls]
    rows = {row["class"]: row for row in r["colour"]["by_class"]}
    assert rows[cls]["own"] and not rows[other]["own"]
    assert rows[cls]["nearest"] and not rows[other]["nearest"]
    assert rows[cls]["od_w1"] < rows[other]["od_w1"] / 4
    # the main distances are those to the own class's references (the same patches)
    assert np.mean(r["colour"]["distances"]["od_w1"]) == pytest.approx(rows[cls]["od_w1"], abs=1e-4)
    # the amounts in the fixed basis are the ones the slides were made with (±40 % uniform: mean 1)
    for row in (rows[cls], {"amounts": r["colour"]["generated"]["amounts"]}):
        assert row["amounts"] == pytest.approx(AMOUNTS[cls], rel=0.08)
    assert not any("reference" in n and "class" in n for n in r["notes"])
    json.dumps(r)


def test_class_free_store_with_labels_uses_all_references(data):
    r = evaluate.evaluate(data["free"], [data["refs"]], options=opts(reference_labels="folders"))
    assert r["slide"]["class"] is None
    assert r["references"]["compared"] == "all" and r["references"]["n"] == 4
    assert len(r["options"]["references"]) == 4
    assert any("no class: compared with all 4" in n for n in r["notes"])
    nearest = [row["class"] for row in r["colour"]["by_class"] if row["nearest"]]
    assert nearest == ["purple"]
    assert not any(row["own"] for row in r["colour"]["by_class"])


def test_class_store_with_unlabelled_references_uses_all_with_a_note(data):
    r = evaluate.evaluate(data["pink"], [data["refs"]], options=opts())
    assert r["references"] == {"slide_class": "pink", "class_source": "store", "compared": "all", "n": 4,
                               "total": 4, "labels": None, "classes": None}
    assert any("class 'pink' but the references are not labelled" in n for n in r["notes"])
    assert "by_class" not in r["colour"]


def test_class_option_for_an_exported_slide(data):
    r = evaluate.evaluate(data["purple-tif"], [data["refs"]],
                          options=opts(reference_labels="folders", slide_class="purple"))
    assert r["references"]["class_source"] == "--class" and r["references"]["n"] == 2
    assert all("/purple/" in p for p in r["options"]["references"])
    # --class overrides a store's own class: the purple store against the pink references
    r = evaluate.evaluate(data["purple"], [data["refs"]],
                          options=opts(reference_labels="folders", slide_class="pink"))
    assert all("/pink/" in p for p in r["options"]["references"])
    rows = {row["class"]: row for row in r["colour"]["by_class"]}
    assert rows["pink"]["own"] and rows["purple"]["nearest"]


def test_csv_labels(data, tmp_path):
    refs = data["refs"]
    csv = tmp_path / "labels.csv"
    # file names, a path relative to the folder given, and a third class of one slide
    csv.write_text("slide,label\npink0.tif,pink\npink/pink1.tif,pink\npurple0.tif,purple\n"
                   "purple1.tif,odd\n")
    r = evaluate.evaluate(data["purple"], [refs], options=opts(reference_labels=str(csv)))
    assert r["references"]["classes"] == {"odd": 1, "pink": 2, "purple": 1}
    assert r["references"]["n"] == 1 and r["options"]["references"][0].endswith("purple0.tif")
    assert [row["n_references"] for row in r["colour"]["by_class"]] == [1, 2, 1]
    csv.write_text("pink0.tif,pink\n")
    with pytest.raises(UsageError, match="has no label"):
        evaluate.evaluate(data["purple"], [refs], options=opts(reference_labels=str(csv)))


def test_errors(data, tmp_path):
    with pytest.raises(UsageError, match="no reference slide is labelled 'pink'.*purple 2"):
        evaluate.evaluate(data["pink"], [data["refs"] / "purple"], options=opts(reference_labels="folders"))
    with pytest.raises(UsageError, match="give some with -r"):
        evaluate.evaluate(data["pink"], [], options=opts(reference_labels="folders"))
    out = tmp_path / "report"
    r = run("evaluate", data["pink"], "-r", data["refs"] / "purple", "--reference-labels", "folders",
            "--patch-size", "32", "--patches", "4", "-o", out)
    assert r.exit_code == 2
    assert "no reference slide is labelled 'pink'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    r = run("evaluate", data["pink"], "-r", data["refs"], "--reference-labels", tmp_path / "none.csv")
    assert r.exit_code == 2 and "label file not found" in r.stderr


def test_cli_shows_the_class_and_the_table(data):
    r = run("evaluate", data["purple"], "-r", data["refs"], "--reference-labels", "folders",
            "--patch-size", "32", "--patches", "4", "--mpp", str(MPP))
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())  # rich wraps at the terminal's width
    assert "class purple (guidance 1)" in out
    assert "references: 2 of 4, those of class purple (the store's class)" in out
    assert "Colour by reference class" in out and "nearest" in out
    r = run("evaluate", data["free"], "-r", data["refs"], "--reference-labels", "folders", "--json",
            "--patch-size", "32", "--patches", "4", "--mpp", str(MPP))
    assert json.loads(r.stdout)["references"]["compared"] == "all"


def test_feature_metrics_follow_the_selection(data, tmp_path):
    """FID against the own class's references is far below FID against the other class's: the
    feature sets are the selected references' (a random ResNet still sees a colour change)."""
    from wsigen.nets.resnet import ResNet50

    torch.manual_seed(0)
    torch.save(ResNet50().state_dict(), tmp_path / "r50.pth")
    fid = {}
    for cls in AMOUNTS:
        o = opts(reference_labels="folders", slide_class=cls, features=str(tmp_path / "r50.pth"),
                 features_size=48, device="cpu")
        (row,) = evaluate.evaluate(data["purple"], [data["refs"]], options=o)["features"]["scales"]
        fid[cls] = row["fid"]
    assert fid["purple"] < fid["pink"] / 2, fid


@pytest.mark.parametrize("fmt", ["ome-tiff", "svs"])
def test_an_export_of_a_class_store_gives_its_class(data, tmp_path, fmt):
    out = tmp_path / ("pink.ome.tif" if fmt == "ome-tiff" else "pink.svs")
    assert run("export", data["pink"], "--format", fmt, "-o", out).exit_code == 0
    r = evaluate.evaluate(out, [data["refs"]], options=opts(reference_labels="folders"))
    assert r["references"]["class_source"] == "export provenance"
    assert r["references"]["slide_class"] == "pink" and r["references"]["n"] == 2
    # a plain image records nothing: all references, as before
    r = evaluate.evaluate(data["pink-tif"], [data["refs"]], options=opts(reference_labels="folders"))
    assert r["references"]["slide_class"] is None and r["references"]["n"] == 4


def test_reference_stores_in_class_folders(data, tmp_path):
    """Stores laid out as refs/<class>/x.zarr are found below the folder and labelled by it."""
    refs = tmp_path / "store-refs"
    for cls in AMOUNTS:
        for i in range(2):
            write_store(refs / cls / f"{cls}{i}.zarr", he_image(256, cls, 20 + i), None)
    r = evaluate.evaluate(data["pink"], [refs], options=opts(reference_labels="folders"))
    assert r["references"]["n"] == 2 and r["references"]["classes"] == {"pink": 2, "purple": 2}
    assert all("/pink/" in p for p in r["options"]["references"])
