"""Named networks: the paper's UNet (parameters and GFLOP pinned), JSON architectures, overrides,
``--arch`` in ``wsigen train`` / ``wsigen model init``, and a resume that may not change it."""

from __future__ import annotations

import json

import imagecodecs
import numpy as np
import pytest
import torch
from clitools import invoke
from torch.utils.flop_counter import FlopCounterMode

from wsigen.errors import UsageError
from wsigen.nets import UNet, archs
from wsigen.slides import checkpoint
from wsigen.training import TrainConfig, TrainOptions, arch_options


def _count(net_cfg, side: int) -> tuple[int, float]:
    """(parameters, GFLOP of one evaluation at side²), built on the meta device (no memory)."""
    with torch.device("meta"):
        net = UNet(net_cfg)
        x = torch.zeros(1, 3, side, side)
        t = torch.zeros(1)
    with FlopCounterMode(display=False) as fc:
        net(x, t, t)
    return sum(p.numel() for p in net.parameters()), fc.get_total_flops() / 1e9


def test_paper_network_is_as_published_and_its_cost_pinned():
    a = archs.NAMED["paper"]
    assert a.patch == 512 and a.net.width == 64 and a.net.mults == (1, 2, 2, 4, 4, 4)
    assert a.net.blocks == 2 and a.net.dropout == 0.1
    # attention at 32² and 16²: the levels whose side is 512 / 2^level
    assert [512 >> lvl for lvl in a.net.attn_levels] == [32, 16]
    params, gflop = _count(a.net, 512)
    assert params == archs.PAPER_PARAMETERS
    assert gflop == pytest.approx(archs.PAPER_GFLOP_512, abs=0.01)
    # the same count as a real (CPU) module, and more than the small default by far
    assert params > 30 * _count(archs.NAMED["small"].net, 64)[0]


def test_small_is_the_training_default():
    a, cfg = archs.NAMED["small"], TrainConfig()
    assert (cfg.width, cfg.mults, cfg.blocks, cfg.attn_levels, cfg.patch) == (
        a.net.width, a.net.mults, a.net.blocks, a.net.attn_levels, a.patch)
    assert TrainConfig(**{k: v for k, v in arch_options("small").items()}).arch() == cfg.arch()


def test_json_arch_and_overrides(tmp_path):
    p = tmp_path / "net.json"
    p.write_text(json.dumps({"width": 8, "mults": [1, 2], "attn_levels": [1], "patch": 16}))
    a = archs.resolve(str(p))
    assert a.net.width == 8 and a.net.mults == (1, 2) and a.net.attn_levels == (1,) and a.patch == 16
    o = arch_options(str(p), blocks=2, dropout=0.2)
    assert o["blocks"] == 2 and o["dropout"] == 0.2 and o["width"] == 8 and o["arch_name"] == str(p)
    o = arch_options("paper", attn_levels=(), patch=256)
    assert o["attn_levels"] == () and o["patch"] == 256 and o["width"] == 64
    p.write_text(json.dumps({"width": 8, "heads": 4}))
    with pytest.raises(UsageError, match="unknown field.*heads"):
        archs.resolve(str(p))
    for text, match in [("{", "not a readable JSON"), ("[1]", "JSON object"),
                        ('{"dropout": 1.5}', "dropout"), ('{"mults": [1, 2], "attn_levels": [5]}', "attn")]:
        p.write_text(text)
        with pytest.raises(UsageError, match=match):
            archs.resolve(str(p))
    with pytest.raises(UsageError, match="small, paper or a JSON"):
        archs.resolve("huge")
    with pytest.raises(UsageError, match="not found"):
        archs.resolve(str(tmp_path / "none.json"))
    assert archs.parse_levels("4, 5") == (4, 5) and archs.parse_levels("none") == ()
    with pytest.raises(UsageError, match="--attn-levels"):
        archs.parse_levels("a")


def test_model_init_arch_paper_and_info(tmp_path):
    out = tmp_path / "p.safetensors"
    r = invoke("model", "init", "--arch", "paper", "-o", out)
    assert r.exit_code == 0, r.output
    cfg = checkpoint.read_config(out)
    assert cfg["patch"] == 512 and cfg["arch"]["attn_levels"] == [4, 5] and cfg["arch"]["dropout"] == 0.1
    r = invoke("model", "info", out)
    assert r.exit_code == 0 and f"{archs.PAPER_PARAMETERS:,}" in r.output
    # overrides of single fields, and refusals that write nothing
    r = invoke("model", "init", "--arch", "paper", "--blocks", "1", "--attn", "none", "--patch", "64",
               "-o", tmp_path / "q.safetensors")
    assert r.exit_code == 0, r.output
    q = checkpoint.read_config(tmp_path / "q.safetensors")["arch"]
    assert q["blocks"] == 1 and q["attn_levels"] == [] and q["width"] == 64
    bad = tmp_path / "bad.json"
    bad.write_text('{"width": 8, "colour": 1}')
    r = invoke("model", "init", "--arch", bad, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "unknown field" in r.output and not (tmp_path / "x.safetensors").exists()


def test_model_init_without_arch_is_unchanged(tmp_path):
    # record_bytes.py builds its tiny net with plain `model init`: same config as before
    r = invoke("model", "init", "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output
    a = checkpoint.read_config(tmp_path / "t.safetensors")["arch"]
    assert a == {"name": "unet", "width": 16, "mults": [1, 2, 2], "blocks": 1, "attn_levels": [],
                 "emb_freqs": 16, "dropout": 0.0}


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = np.clip(np.array([215, 140, 185]) + rng.normal(0, 20, (128, 128, 3)), 0, 255).astype(np.uint8)
    p = tmp_path_factory.mktemp("s") / "t.png"
    p.write_bytes(imagecodecs.png_encode(img))
    return p


def test_train_arch_file_and_resume_with_other_arch_refused(tmp_path, slide_png):
    net = tmp_path / "net.json"
    net.write_text(json.dumps({"width": 8, "mults": [1, 2], "dropout": 0.1, "patch": 16}))
    out = tmp_path / "run"
    common = ["train", slide_png, "-o", out, "--mpp", "1", "--batch", "2", "--preview-every", "0",
              "--sample-steps", "3", "--device", "cpu"]
    r = invoke(*common, "--arch", net, "--max-steps", "1")
    assert r.exit_code == 0, r.output
    a = checkpoint.read_config(out / "model.safetensors")["arch"]
    assert a["width"] == 8 and a["dropout"] == 0.1
    before = sorted(p.name for p in out.rglob("*"))
    r = invoke(*common, "--arch", "small", "--max-steps", "2", "--resume")
    assert r.exit_code == 2 and "different network" in r.output
    assert sorted(p.name for p in out.rglob("*")) == before
    r = invoke(*common, "--arch", net, "--max-steps", "2", "--resume")
    assert r.exit_code == 0, r.output
    assert checkpoint.load_model(out).config["training"]["step"] == 2


def test_options_record_the_arch_and_refuse_a_change():
    saved = TrainConfig(**arch_options("small"))
    with pytest.raises(UsageError, match="different network"):
        TrainOptions.parse(**arch_options("paper")).resumed(saved)
    assert TrainOptions.parse(**arch_options("small"), max_steps=5).resumed(saved).max_steps == 5
