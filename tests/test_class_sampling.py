"""Sampling a class (--class, --guidance): config, key, info, exports, sets, plan and bad input."""

import json

import pytest
import zarr
from clitools import invoke

from wsigen.slides.checkpoint import init_model

SMALL = ["--size", "64", "--steps", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmodels")
    common = dict(seed=1, patch=32, steps=6, guided_steps=4, mpp_range=[0.25, 256.0],
                  recommended_size=64, final_mpp=1.0)
    init_model(d / "c.safetensors", {"width": 8, "mults": [1, 2]}, classes=["normal", "tumour"], **common)
    init_model(d / "c0.safetensors", {"width": 8, "mults": [1, 2]}, classes=["normal", "tumour"],
               label_dropout=0.0, **common)
    init_model(d / "free.safetensors", {"width": 8, "mults": [1, 2]}, **common)
    return d


def _wsigen(store):
    return zarr.open_group(str(store), mode="r").attrs["wsigen"]


def _pixels(store):
    return zarr.open_group(str(store), mode="r")["0"][:]


def test_class_in_config_key_summary_and_info(models, tmp_path):
    out = tmp_path / "a.zarr"
    r = invoke("sample", "--model", models / "c.safetensors", "--class", "tumour", "--guidance", "2",
               *SMALL, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert (s["class"], s["guidance"]) == ("tumour", 2.0)
    w = _wsigen(out)
    for block in ("config", "key"):
        assert (w[block]["class"], w[block]["class_index"], w[block]["guidance"]) == ("tumour", 1, 2.0)
    info = invoke("info", out)
    assert "class      tumour (classifier-free guidance w = 2)" in info.output


def test_class_and_guidance_change_the_slide_and_the_key(models, tmp_path):
    runs = {}
    for name, extra in {"free": [], "normal": ["--class", "normal"], "tumour": ["--class", "tumour"],
                        "tumour3": ["--class", "tumour", "--guidance", "3"]}.items():
        out = tmp_path / f"{name}.zarr"
        assert invoke("sample", "--model", models / "c.safetensors", *extra, *SMALL, "-o", out).exit_code == 0
        runs[name] = (_pixels(out), _wsigen(out)["key"])
    assert "class" not in runs["free"][1] and "guidance" not in runs["free"][1]
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert runs[a][1] != runs[b][1], (a, b)
            assert (runs[a][0] != runs[b][0]).any(), (a, b)


def test_w1_costs_one_evaluation_and_other_w_two(models, tmp_path):
    ev = {}
    for w in ("1", "0", "3"):
        r = invoke("sample", "--model", models / "c.safetensors", "--class", "normal", "--guidance", w, *SMALL,
                   "-o", tmp_path / f"w{w}.zarr", "--json")
        ev[w] = json.loads(r.stdout[r.stdout.index("{"):])["evaluations"]
    assert ev["1"] == ev["0"] and ev["3"] == 2 * ev["1"]
    plan = [json.loads(invoke("plan", "--model", models / "c.safetensors", "--size", "64", "--steps", "3",
                              *g, "--json").stdout) for g in ([], ["--guidance", "3"], ["--guidance", "1"])]
    assert plan[1]["evaluations"] == 2 * plan[0]["evaluations"] == 2 * plan[1]["denoiser_calls"]
    assert plan[2]["evaluations"] == plan[0]["evaluations"]
    assert [s["evaluations"] for s in plan[1]["stages"]] == [2 * s["evaluations"] for s in plan[0]["stages"]]
    assert ev["1"] == plan[0]["evaluations"]


def test_a_class_free_model_is_unchanged_by_class_support(models, tmp_path):
    """A class-free model's store, key and recorded checkpoint config carry no class field."""
    out = tmp_path / "f.zarr"
    assert invoke("sample", "--model", models / "free.safetensors", *SMALL, "-o", out).exit_code == 0
    w = _wsigen(out)
    assert not {"class", "class_index", "guidance"} & (set(w["config"]) | set(w["key"]))
    assert "classes" not in w["model"]["config"] and "classes" not in w["model"]["config"]["arch"]


def test_count_cycles_through_classes(models, tmp_path):
    out = tmp_path / "set"
    r = invoke("sample", "--model", models / "c.safetensors", "--class", "normal,tumour", "--count", "3",
               *SMALL, "-o", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert [s["class"] for s in m["slides"]] == ["normal", "tumour", "normal"]
    for s in m["slides"]:
        assert _wsigen(out / s["store"])["config"]["class"] == s["class"]


def test_export_records_the_class(models, tmp_path):
    out = tmp_path / "e.zarr"
    invoke("sample", "--model", models / "c.safetensors", "--class", "tumour", *SMALL, "-o", out)
    import tifffile

    for fmt, name in (("ome-tiff", "e.ome.tif"), ("svs", "e.svs"), ("tiff", "e.tif")):
        assert invoke("export", out, "--format", fmt, "-o", tmp_path / name).exit_code == 0
        with tifffile.TiffFile(tmp_path / name) as t:
            desc = t.pages[0].description
        assert "tumour" in desc, fmt


@pytest.mark.parametrize("args, msg, code", [
    (["--model", "c.safetensors", "--class", "stroma"], "knows the classes normal, tumour", 1),
    (["--model", "free.safetensors", "--class", "tumour"], "is class-free", 1),
    (["--model", "c.safetensors", "--guidance", "2"], "--guidance needs --class", 2),
    (["--model", "c0.safetensors", "--class", "tumour", "--guidance", "2"], "--label-dropout 0", 1),
    (["--model", "c0.safetensors"], "choose a class with --class (normal, tumour)", 1),
    (["--model", "c.safetensors", "--class", "normal,tumour"], "several classes need --count", 2),
    (["--model", "c.safetensors", "--class", "normal,"], "comma-separated", 2),
])
def test_bad_class_choices_are_one_line_and_write_nothing(models, tmp_path, args, msg, code):
    args = [models / a if str(a).endswith(".safetensors") else a for a in args]
    out = tmp_path / "x.zarr"
    r = invoke("sample", *args, *SMALL, "-o", out)
    assert r.exit_code == code, r.output
    assert msg in r.output and r.output.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_resume_with_another_class_or_guidance_is_refused(models, tmp_path, monkeypatch):
    from clitools import interrupt_at

    out = tmp_path / "r.zarr"
    base = ["sample", "--model", models / "c.safetensors", "--class", "tumour", "--guidance", "2", *SMALL]
    interrupt_at(monkeypatch, "stage", (1,))
    assert invoke(*base, "-o", out).exit_code == 130
    monkeypatch.undo()
    before = _wsigen(out)
    for change in (["--class", "normal"], ["--class", "tumour", "--guidance", "3"]):
        r = invoke("sample", "--resume", "-o", out, *change)
        assert r.exit_code == 2 and "conflict" in r.output, r.output
    assert _wsigen(out) == before
    assert invoke("sample", "--resume", "-o", out).exit_code == 0
    ref = tmp_path / "ref.zarr"
    assert invoke(*base, "-o", ref).exit_code == 0
    assert (_pixels(out) == _pixels(ref)).all()


def test_upscale_takes_a_class(models, tmp_path):
    src = tmp_path / "in.zarr"
    invoke("sample", "--model", models / "free.safetensors", *SMALL, "-o", src)
    invoke("export", src, "--format", "tiff", "-o", tmp_path / "in.tif")
    out = tmp_path / "up.zarr"
    r = invoke("upscale", tmp_path / "in.tif", "--model", models / "c.safetensors", "--class", "normal",
               "--guidance", "1.5", "--factor", "2", "--steps", "3", "-o", out)
    assert r.exit_code == 0, r.output
    assert (_wsigen(out)["config"]["class"], _wsigen(out)["config"]["guidance"]) == ("normal", 1.5)


def test_no_class_and_w0_sample_the_class_free_network_byte_for_byte(models, tmp_path):
    """The conditional model without a class, and with any class at w = 0, is the class-free
    network: the same weights saved without the class embedding give the same bytes."""
    from wsigen.slides.checkpoint import build_denoiser, load_model, save_checkpoint

    lm = load_model(models / "c.safetensors")
    cfg = {k: v for k, v in lm.config.items() if k not in ("classes", "class_slides", "label_dropout")}
    cfg["arch"] = {k: v for k, v in cfg["arch"].items() if k != "classes"}
    free = build_denoiser(cfg)
    free.load_state_dict({k: v for k, v in lm.denoiser.state_dict().items() if "class_emb" not in k})
    save_checkpoint(tmp_path / "same.safetensors", free, cfg)
    outs = {}
    for name, args in {"free": ["--model", tmp_path / "same.safetensors"],
                       "none": ["--model", models / "c.safetensors"],
                       "w0": ["--model", models / "c.safetensors", "--class", "tumour", "--guidance", "0"],
                       "w1": ["--model", models / "c.safetensors", "--class", "tumour"]}.items():
        out = tmp_path / f"{name}.zarr"
        assert invoke("sample", *args, *SMALL, "-o", out).exit_code == 0
        outs[name] = _pixels(out)
    assert (outs["none"] == outs["free"]).all() and (outs["w0"] == outs["free"]).all()
    assert (outs["w1"] != outs["free"]).any()


def test_exports_carry_the_class_back(models, tmp_path):
    """Every TIFF-family export and the DICOM folder give the class back (info, evaluate)."""
    from wsigen.slides.dicom_read import describe
    from wsigen.slides.export_meta import read_provenance

    out = tmp_path / "p.zarr"
    invoke("sample", "--model", models / "c.safetensors", "--class", "tumour", "--guidance", "2.5", *SMALL,
           "-o", out)
    for fmt, name in (("ome-tiff", "p.ome.tif"), ("svs", "p.svs"), ("tiff", "p.tif")):
        assert invoke("export", out, "--format", fmt, "-o", tmp_path / name).exit_code == 0
        prov = read_provenance(tmp_path / name)
        assert (prov["class"], float(prov["guidance"])) == ("tumour", 2.5), fmt
    assert invoke("export", out, "--format", "dicom", "-o", tmp_path / "d").exit_code == 0
    d = describe(tmp_path / "d")
    assert (d["class"], d["guidance"]) == ("tumour", 2.5)
    assert "class      tumour" in invoke("info", tmp_path / "d").output
    free = tmp_path / "f.zarr"
    invoke("sample", "--model", models / "free.safetensors", *SMALL, "-o", free)
    invoke("export", free, "--format", "tiff", "-o", tmp_path / "f.tif")
    assert "class" not in read_provenance(tmp_path / "f.tif")
    assert read_provenance(tmp_path / "nothing.tif") is None
