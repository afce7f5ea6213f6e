"""``wsigen evaluate``: seams, guide consistency, colour, patch metrics and the memorisation audit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clitools import SVS
from clitools import invoke as run

from wsigen import api
from wsigen.judge import evaluate, metrics
from wsigen.slides import readers
from wsigen.slides.store import SlideStore


@pytest.fixture(scope="module")
def gaussian_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "g.zarr"
    api.sample(out, 256, model="gaussian", patch=32, steps=4, device="cpu", threads=1, mpp=0.5)
    return out


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A 'training slide' (a 1536² crop of the real slide) and a 'generated' slide that is a
    768² crop of it: the audit must flag that one. Small files keep the tests fast."""
    import tifffile

    d = tmp_path_factory.mktemp("ev")
    with readers.open_image(SVS) as s:
        train, copy = s.read_region(200, 900, 1536, 1536), s.read_region(600, 1200, 768, 768)
    for name, rgb in (("train.tif", train), ("copy.tif", copy)):
        tifffile.imwrite(d / name, rgb, photometric="rgb", resolution=(1e4 / 0.499, 1e4 / 0.499),
                         resolutionunit="CENTIMETER")
    return d / "train.tif", d / "copy.tif"


def smooth_random_unet(path, steps: int, guided: int):
    """The tiny UNet with random weights made non-negative and normalised, so every convolution
    averages: its output is smooth inside a patch, the condition under which a seam is visible.
    (Plain random weights give white noise in which no seam can be seen.)"""
    from safetensors.torch import load_file

    from wsigen.slides.checkpoint import build_denoiser, init_model, read_config, save_checkpoint

    init_model(path, {"width": 8, "mults": [1, 2]}, seed=1, patch=32, steps=steps, guided_steps=guided)
    cfg = read_config(path)
    net = build_denoiser(cfg)
    net.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 4:
                p.abs_()
                p.div_(p.sum(dim=(1, 2, 3), keepdim=True))
            if name.endswith("out.weight"):
                p.mul_(10)
    save_checkpoint(path, net, cfg)
    return path


def test_fixed_grid_scores_clearly_above_grid_shift(tmp_path):
    model = smooth_random_unet(tmp_path / "smooth.safetensors", steps=4, guided=2)
    scores = {}
    for shift in (True, False):
        out = tmp_path / f"s{shift}.zarr"
        api.sample(out, 128, model=model, seed=0, solver="euler", grid_shift=shift, device="cpu",
                   threads=1)
        final = evaluate.stage_metrics(SlideStore.open(out))[-1]["seams"]
        scores[shift] = (final["fixed_grid"]["score"], final["last_step_grid"]["score"])
        # every step's grid is scored when the grid shifts (none to score otherwise)
        assert ("worst_step_grid" in final) == shift
    fixed_run = scores[False][0]
    assert scores[False][0] == scores[False][1]  # without shifting, the last grid is the fixed one
    assert fixed_run > 1.8, scores
    assert max(scores[True]) < 1.3, scores
    assert fixed_run > 1.5 * max(scores[True])


def test_stage_metrics_of_a_gaussian_store(gaussian_store):
    store = SlideStore.open(gaussian_store)
    rows = evaluate.stage_metrics(store)
    assert [r["stage"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["seams"] is None and rows[0]["guide_psnr_db"] is None
    k = 2
    for r in rows[1:]:
        # a pixel-wise model has no seams: both grids score ≈ 1
        for g in ("fixed_grid", "last_step_grid", "worst_step_grid"):
            assert r["seams"][g]["score"] == pytest.approx(1, abs=0.12), r
        assert 0 <= r["seams"]["worst_step_grid"]["step"] < 4
        # the streamed guide PSNR equals a direct computation on whole arrays
        a = np.asarray(store.stage_array(r["stage"])[:])
        g = np.asarray(store.stage_array(r["stage"] - 1)[:]).astype(np.float64)
        mse = ((metrics.avgpool(a, k) - g) ** 2).mean()
        assert r["guide_psnr_db"] == pytest.approx(metrics.psnr(mse))
        assert 20 < r["guide_psnr_db"] < 60
    # a smaller pixel budget samples bands of rows and still reports
    sampled = evaluate.stage_metrics(store, max_pixels=64 * 256, band=32)
    assert sampled[-1]["sampled_rows"] == 0.25 and sampled[-1]["seams"]["fixed_grid"]["score"] > 0


def test_report_without_weights_or_references(gaussian_store):
    r = evaluate.evaluate(gaussian_store, options=evaluate.Options(patch_size=32, patches=6))
    assert r["features"] is None and r["memorisation"] is None
    assert r["mpps"] == [0.5, 2.0]
    assert any("no --features weights" in n for n in r["notes"])
    assert r["colour"]["generated"]["pixels"] > 0 and "distances" not in r["colour"]
    json.dumps(r)  # JSON-ready


def test_colour_close_for_a_copy_far_for_gaussian(crops, gaussian_store):
    train, copy = crops
    o = evaluate.Options(patch_size=32, patches=24, mpps=[1.0])
    near = evaluate.evaluate(copy, [train], options=o)["colour"]["distances"]
    far = evaluate.evaluate(gaussian_store, [train], options=o)["colour"]["distances"]
    assert near["H_angle_deg"] < 10 and near["E_angle_deg"] < 10
    assert far["H_angle_deg"] > 30 and far["E_angle_deg"] > 15
    for key in ("od_w1", "rgb_w1", "concentration_w1"):
        assert np.mean(far[key]) > 2 * np.mean(near[key]), key


def test_memorisation_flags_a_copy_not_a_gaussian(crops, gaussian_store, tmp_path):
    train, copy_of_training = crops
    o = evaluate.Options(patch_size=32, patches=20, mpps=[2.0], training_patches=3000,
                         output_dir=str(tmp_path / "copy"))
    copy = evaluate.evaluate(copy_of_training, [], [train], options=o)["memorisation"]
    row = copy["scales"][0]
    assert "right-most fifth" in copy["held_out"]
    assert row["pixel"]["suspicious"] and row["pixel"]["near_copies"] >= 2
    assert row["n_training"] > 500 and row["n_held_out"] == 20
    from PIL import Image

    assert Image.open(copy["pairs_images"][0]).width > 400
    o.output_dir = None
    gauss = evaluate.evaluate(gaussian_store, [], [train], options=o)["memorisation"]["scales"][0]
    assert not gauss["pixel"]["suspicious"]
    assert gauss["pixel"]["relative"]["generated"]["min"] > copy["scales"][0]["pixel"]["relative"]["generated"]["min"]


def test_feature_metrics_with_random_resnet_weights(gaussian_store, tmp_path):
    from wsigen.nets.resnet import ResNet50

    torch.manual_seed(0)
    torch.save(ResNet50().state_dict(), tmp_path / "r50.pth")
    o = evaluate.Options(patch_size=32, patches=6, mpps=[0.5], features=str(tmp_path / "r50.pth"),
                         features_size=48, device="cpu")
    r = evaluate.evaluate(gaussian_store, [gaussian_store], options=o)
    (row,) = r["features"]["scales"]
    assert r["features"]["network"]["arch"] == "resnet50"
    assert row["n_generated"] == row["n_reference"] == 6
    assert row["fid"] >= 0 and np.isfinite(row["kid"]) and 0 <= row["precision"] <= 1
    # the same slide as its own reference (other patches of it): no memorisation audit, small FID
    assert r["memorisation"] is None


def test_cli_table_json_and_errors(gaussian_store, tmp_path):
    r = run("evaluate", gaussian_store, "--patch-size", "32", "--patches", "4", "--mpp", "2")
    assert r.exit_code == 0, r.output
    assert "Cascade: seams" in r.stdout and "PSNR" in r.stdout and "no --features" in r.stdout
    r = run("evaluate", gaussian_store, "--patch-size", "32", "--patches", "4", "--mpp", "2", "--json",
            "-o", tmp_path / "rep")
    rep = json.loads(r.stdout)
    assert rep["stages"][-1]["seams"]["last_step_grid"]["offset"]
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["mpps"] == [2.0]
    assert run("evaluate", gaussian_store, "--mpp", "x").exit_code == 2
    assert run("evaluate", gaussian_store, "--features-arch", "vgg").exit_code == 2
    r = run("evaluate", gaussian_store, "--features", tmp_path / "none.safetensors", "--patch-size", "32")
    assert r.exit_code == 1 and "not found" in r.stderr
    r = run("evaluate", tmp_path / "missing.zarr")
    assert r.exit_code == 1
