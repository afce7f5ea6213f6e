"""Training: s ~ U(s_min, s_max), tissue filter, loss goes down, checkpoints, exact resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from wsigen.cli import train as train_cmd
from wsigen.errors import UsageError, WsigenError
from wsigen.judge import stains
from wsigen.method import edm
from wsigen.slides import checkpoint, readers
from wsigen.training import TrainConfig, TrainOptions, data, loss_history, train

GLASS = (240, 238, 245)
TINY = dict(
    patch=16,
    width=8,
    mults=(1, 2),
    batch=4,
    lr=2e-3,
    lr_warmup=1,
    preview_every=0,
    checkpoint_every=1000,
    slide_mpp=1.0,
    sample_steps=4,
    seed=3,
    device="cpu",
)


def synthetic_slide(size: int = 256, seed: int = 0) -> np.ndarray:
    """Glass on the right half, pink/purple 'tissue' with dark 'nuclei' on the left half."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = GLASS
    tissue = np.array([225, 150, 190]) + rng.normal(0, 12, (size, size // 2, 3))
    yy, xx = np.mgrid[:size, : size // 2]
    for cy, cx in rng.integers(0, size, (60, 2)):
        tissue[(yy - cy) ** 2 + (xx - cx // 2) ** 2 < 16] = (90, 60, 150)
    img[:, : size // 2] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("slides") / "synthetic.png"
    p.write_bytes(imagecodecs.png_encode(synthetic_slide()))
    return p


def slide_data(size: int = 256, mpp: float = 0.5) -> data.SlideData:
    s = readers.ArraySlide(synthetic_slide(size), mpp)
    thumb = s.thumbnail(128)
    mask = data.tissue_mask(thumb)
    return data.SlideData(s, mask, s.width / thumb.shape[1], data.glass_colour(thumb, mask))


def ks_uniform(u: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance of samples in [0, 1] from U(0, 1)."""
    u = np.sort(u)
    n = len(u)
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def test_mpp_defaults_from_data():
    sd = slide_data(256, 0.5)
    smp = data.PatchSampler([sd], 32)
    assert smp.mpp_min == 0.5 and smp.mpp_max == pytest.approx(256 * 0.5 / 32)
    with pytest.raises(UsageError, match="does not fit"):
        data.PatchSampler([sd], 32, mpp_max=5)


@pytest.mark.parametrize("how", ["uniform", "log-uniform"])
def test_sampled_mpp_distribution(how):
    smp = data.PatchSampler(
        [slide_data()], 16, mpp_min=0.6, mpp_max=7.0, mpp_sampling=how, augment=False
    )
    rng = np.random.default_rng(0)
    s = np.array([smp.draw_mpp(rng) for _ in range(4000)])
    assert s.min() >= 0.6 and s.max() <= 7.0
    u = (s - 0.6) / 6.4 if how == "uniform" else np.log(s / 0.6) / np.log(7.0 / 0.6)
    assert ks_uniform(u) < 1.36 / np.sqrt(len(s))  # 95 % KS bound
    # and the other law is clearly rejected: the test can fail
    v = np.log(s / 0.6) / np.log(7.0 / 0.6) if how == "uniform" else (s - 0.6) / 6.4
    assert ks_uniform(v) > 0.1
    # the s of whole patches (tissue retries redraw the position only) has the same law
    _, s2 = smp.batch(np.random.default_rng(1), 300)
    u2 = (
        (s2.numpy() - 0.6) / 6.4
        if how == "uniform"
        else np.log(s2.numpy() / 0.6) / np.log(7.0 / 0.6)
    )
    assert ks_uniform(u2) < 1.36 / np.sqrt(300)


@pytest.mark.parametrize("threshold,expect_min", [(0.9, 0.8), (0.0, None)])
def test_tissue_threshold(threshold, expect_min):
    smp = data.PatchSampler([slide_data()], 16, mpp_min=1.0, mpp_max=2.0, min_tissue=threshold)
    rng = np.random.default_rng(2)
    fr = [data.tissue_mask(smp.sample(rng)[0]).mean() for _ in range(60)]
    if expect_min is not None:
        assert min(fr) >= expect_min
    else:
        assert min(fr) < 0.2  # without a threshold, glass patches are drawn too


def test_batch_layout_and_determinism():
    smp = data.PatchSampler([slide_data()], 16, mpp_min=1.0, mpp_max=4.0)
    x, s = smp.batch(np.random.default_rng(5), 6)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and s.shape == (6,)
    assert x.min() >= -1 and x.max() <= 1
    x2, s2 = smp.batch(np.random.default_rng(5), 6)
    assert torch.equal(x, x2) and torch.equal(s, s2)


def test_dihedral_group():
    a = np.arange(12).reshape(2, 2, 3)
    seen = {data.dihedral(a, k).tobytes() for k in range(8)}
    assert len(seen) == 8


def test_glass_colour_measured():
    sd = slide_data()
    np.testing.assert_allclose(sd.glass, GLASS, atol=1)
    assert data.measured_background([sd]) == list(GLASS)


def test_short_training_lowers_loss_on_fixed_batch():
    smp = data.PatchSampler([slide_data()], 16, mpp_min=1.0, mpp_max=4.0)
    x, s = smp.batch(np.random.default_rng(0), 16)
    torch.manual_seed(0)
    cfg = checkpoint.make_config(TrainConfig(width=8, mults=(1, 2)).arch(), patch=16)
    net = checkpoint.build_denoiser(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)

    def fixed_loss():
        g = torch.Generator().manual_seed(123)  # same σ and noise every time
        with torch.no_grad():
            return float(np.mean([edm.edm_loss(net, x, s, g).item() for _ in range(8)]))

    before = fixed_loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        loss = edm.edm_loss(net, x, s, g)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def _assert_same_tensors(a: Path, b: Path):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_checkpoint_round_trip_and_config(tmp_path, slide_file):
    out = tmp_path / "run"
    summary = train(
        [slide_file],
        out,
        max_steps=3,
        mpp_min=1.0,
        final_mpp=2.0,
        **{k: v for k, v in TINY.items()},
    )
    assert summary["step"] == 3 and summary["finished"]
    loaded = checkpoint.load_model(out)
    cfg = loaded.config
    assert cfg["patch"] == 16 and cfg["k"] == 2
    assert cfg["mpp_range"] == [1.0, pytest.approx(256 * 1.0 / 16)]
    assert cfg["final_mpp"] == 2.0 and cfg["recommended_size"] == 16 * 2**3
    assert cfg["background"] == list(GLASS)
    assert cfg["steps"] == 4 and cfg["guided_steps"] == round(0.7 * 4)
    assert "synthetic.png" in cfg["training_data"] and cfg["training"]["step"] == 3
    # the file holds the EMA weights: a denoiser built from them gives identical outputs
    ema = checkpoint.build_denoiser(cfg)
    ema.load_state_dict(_tensors(out / "train-state" / "ema.safetensors"))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sig, mpp = torch.tensor([0.5, 3.0]), torch.tensor([1.0, 8.0])
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, sig, mpp), ema.eval()(x, sig, mpp))
    assert [r["step"] for r in loss_history(out)] == [3]
    state = json.loads((out / "train-state" / "state.json").read_text())
    assert state["step"] == 3 and state["images"] == 12
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in out.rglob("*"))


def test_resume_is_exact(tmp_path, slide_file):
    a, b = tmp_path / "a", tmp_path / "b"
    opts = {**TINY, "log_every": 1}
    train([slide_file], a, max_steps=4, **opts)
    train([slide_file], b, max_steps=2, **opts)
    assert json.loads((b / "train-state" / "state.json").read_text())["step"] == 2
    summary = train([slide_file], b, resume=True, max_steps=4)
    assert summary["step"] == 4 and summary["steps_this_run"] == 2
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        _assert_same_tensors(a / "train-state" / name, b / "train-state" / name)
    _assert_same_tensors(a / "model.safetensors", b / "model.safetensors")
    # the loss log of the resumed run continues the first one
    la, lb = loss_history(a), loss_history(b)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_and_overwrite_rules(tmp_path, slide_file):
    out = tmp_path / "r"
    with pytest.raises(WsigenError, match="nothing to resume|no training state"):
        train([slide_file], out, resume=True, **TINY)
    train([slide_file], out, max_steps=1, **TINY)
    with pytest.raises(WsigenError, match="--resume|--overwrite"):
        train([slide_file], out, max_steps=1, **TINY)
    with pytest.raises(UsageError, match="width"):
        train([slide_file], out, resume=True, max_steps=2, width=16)
    assert train([slide_file], out, overwrite=True, max_steps=1, **TINY)["step"] == 1


def _app() -> typer.Typer:
    app = typer.Typer()
    train_cmd.register(app)

    @app.callback()
    def _cb():
        pass

    return app


def test_cli_passes_options(monkeypatch, tmp_path):
    seen = {}

    def fake_train(slides, output, options, **kw):
        seen.update(slides=slides, out=output, options=options, **kw)
        return {"finished": True, "step": 7, "checkpoint": str(output / "model.safetensors")}

    monkeypatch.setattr("wsigen.training.train", fake_train)
    r = CliRunner().invoke(
        _app(),
        [
            "train",
            "a.svs",
            "dir/",
            "-o",
            str(tmp_path),
            "--max-steps",
            "7",
            "--time-limit",
            "1.5h",
            "--mults",
            "1,2,4",
            "--mpp-min",
            "1",
            "--tissue-threshold",
            "0.4",
            "--resume",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert seen["slides"] == ["a.svs", "dir"] and seen["out"] == tmp_path
    opts = seen["options"]
    assert isinstance(opts, TrainOptions) and seen["resume"] is True
    cfg = opts.config
    assert cfg.max_steps == 7 and cfg.time_limit == 5400 and cfg.mults == (1, 2, 4)
    assert cfg.mpp_min == 1.0 and cfg.tissue_threshold == 0.4 and cfg.device == "cpu"
    assert opts.given == {"max_steps", "time_limit", "mults", "mpp_min", "tissue_threshold", "device"}
    # not given: the library default (or on --resume the saved value)
    assert "batch" not in opts.given and cfg.batch == TrainConfig().batch
    r = CliRunner().invoke(_app(), ["train", "a.svs", "-o", str(tmp_path), "--mults", "1,x"])
    assert r.exit_code == 2 and "--mults" in r.output
    # the options are validated at the edge: train() is never called with a bad one
    seen.clear()
    r = CliRunner().invoke(_app(), ["train", "a.svs", "-o", str(tmp_path), "--mpp-sampling", "x"])
    assert r.exit_code == 2 and "--mpp-sampling" in r.output and not seen
    r = CliRunner().invoke(_app(), ["train", "a.svs", "-o", str(tmp_path), "--patch", "18"])
    assert r.exit_code == 2 and "multiple of 4" in r.output and not seen


def test_config_is_frozen_validated_and_json_compatible():
    cfg = TrainConfig(mults=[1, 2], patch=16)
    assert cfg.mults == (1, 2) and cfg == TrainConfig(mults=(1, 2), patch=16)
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    for bad, match in [
        (dict(patch=18), "multiple of 4"),
        (dict(lr=0.0), "--lr"),
        (dict(device="tpu"), "--device"),
        (dict(mpp_sampling="log"), "--mpp-sampling"),
        (dict(width=6), "bad network"),
    ]:
        with pytest.raises(UsageError, match=match):
            TrainConfig(**bad)
    # the config block of a train-state/state.json: keys and values as written before
    js = cfg.to_json()
    assert js["mults"] == [1, 2] and js["attn_levels"] == [] and js["time_limit"] is None
    assert json.loads(json.dumps(js)) == js and TrainConfig.from_json({**js, "future": 1}) == cfg
    with pytest.raises(UsageError, match="unknown training options: nope"):
        TrainOptions.parse(nope=1)


def test_options_on_resume():
    saved = TrainConfig(patch=16, mults=(1, 2), max_steps=4, seed=3)
    again = TrainOptions.parse(max_steps=8, patch=16, seed=3, device="cpu")
    assert again.resumed(saved) == TrainConfig(patch=16, mults=(1, 2), max_steps=8, seed=3, device="cpu")
    with pytest.raises(UsageError, match=r"seed \(saved 3\)"):
        TrainOptions.parse(seed=4).resumed(saved)
    assert TrainOptions.parse(config=saved).given == {f for f in TrainConfig.__dataclass_fields__}


def test_cli_trains(tmp_path, slide_file):
    out = tmp_path / "cli"
    r = CliRunner().invoke(
        _app(),
        [
            "train",
            str(slide_file.parent),
            "-o",
            str(out),
            "--max-steps",
            "2",
            "--patch",
            "16",
            "--width",
            "8",
            "--mults",
            "1,2",
            "--batch",
            "2",
            "--mpp",
            "1.0",
            "--preview-every",
            "2",
            "--sample-steps",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert (out / "model.safetensors").is_file() and (out / "train-state" / "state.json").is_file()
    assert (out / "preview.png").is_file()
    assert checkpoint.load_model(out).config["training"]["step"] == 2
    r = CliRunner().invoke(
        _app(), ["train", str(tmp_path / "missing.svs"), "-o", str(tmp_path / "x")]
    )
    assert r.exit_code == 1 and "not found" in r.output


def test_stain_normalised_patches():
    sd = slide_data()
    sd.stain = stains.fit_macenko(sd.slide.thumbnail(128))
    kw = dict(mpp_min=1.0, mpp_max=2.0, augment=False)
    plain = data.PatchSampler([sd], 16, **kw)
    normed = data.PatchSampler([sd], 16, stain_target=stains.REFERENCE, **kw)
    a, sa = plain.sample(np.random.default_rng(4))
    b, sb = normed.sample(np.random.default_rng(4))
    assert sa == sb  # same draw, only the colours change
    np.testing.assert_array_equal(b, stains.normalise(a, sd.stain, stains.REFERENCE))
    assert np.abs(a.astype(int) - b).mean() > 3


def test_bundled_default_model():
    lm = checkpoint.load_model("default")
    cfg = lm.config
    assert cfg["arch"]["name"] == "unet" and cfg["patch"] == 64 and cfg["k"] == 2
    lo, hi = cfg["mpp_range"]
    L = 0
    while cfg["patch"] * cfg["k"] ** L < cfg["recommended_size"]:
        L += 1
    # a default `wsigen sample` (recommended size, final µm/px) starts inside the trained range
    assert lo <= cfg["final_mpp"] and cfg["final_mpp"] * cfg["k"] ** L <= hi
    assert "cmu_small_region.svs" in cfg["training_data"] and cfg["training"]["step"] >= 1000
    assert checkpoint.default_model_path().stat().st_size < 8 * 2**20
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        d = lm.denoiser(x, torch.tensor([0.01]), torch.tensor([2.0]))
    assert torch.isfinite(d).all() and (d - x).abs().max() < 0.1  # at tiny σ, D(x) ≈ x
