"""Hostile and broken input (issue 7): every case exits 1 (runtime) or 2 (usage) with one clear
line, no traceback, and leaves nothing that looks complete."""

from __future__ import annotations

import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from wsigen.cli.app import app
from wsigen.slides.checkpoint import META_KEY

G = ["--model", "gaussian", "--patch", "32", "--steps", "2"]


def _png_bomb(path: Path) -> Path:
    """A valid PNG header claiming 10⁶ × 10⁶ px with a tiny body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1_000_000, 1_000_000, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _tiff(path: Path, a: np.ndarray, **kw) -> Path:
    tifffile.imwrite(path, a, resolution=(1e4, 1e4), resolutionunit="CENTIMETER", **kw)
    return path


def _checkpoint_with(path: Path, tensors: dict, config: dict | None) -> Path:
    meta = {META_KEY: json.dumps(config)} if config is not None else None
    save_file(tensors, str(path), metadata=meta)
    return path


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/wsigen-pickle-was-executed"),))


def build_cases(tmp: Path, tiny: Path) -> list[tuple[str, list, int, str]]:
    """(name, argv, exit code, a word the message must contain)."""
    out = str(tmp / "out.zarr")
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    cases = []
    # -- input images (upscale) --
    (tmp / "zero.png").write_bytes(b"")
    cases.append(("zero-byte file", ["upscale", tmp / "zero.png", "--mpp", "1", *G, "-o", out], 1, "empty"))
    good = _tiff(tmp / "good.tif", rgb, tile=(16, 16), compression="jpeg")
    data = good.read_bytes()
    (tmp / "trunc.tif").write_bytes(data[: len(data) // 3])
    cases.append(("truncated TIFF", ["upscale", tmp / "trunc.tif", "--mpp", "1", *G, "-o", out], 1, ""))
    corrupt = bytearray(data)
    with tifffile.TiffFile(good) as tf:
        off = tf.pages[0].dataoffsets[5]
    corrupt[off : off + 40] = b"\xff" * 40
    (tmp / "corrupt.tif").write_bytes(bytes(corrupt))
    cases.append(("corrupt JPEG tile", ["upscale", tmp / "corrupt.tif", "--mpp", "1", *G, "-o", out], 1, ""))
    cases.append(("decompression bomb", ["upscale", _png_bomb(tmp / "bomb.png"), "--mpp", "1", *G, "-o", out],
                  1, "pixels"))
    (tmp / "text.tif").write_text("this is not an image\n")
    cases.append(("text file named .tif", ["upscale", tmp / "text.tif", "--mpp", "1", *G, "-o", out], 1, ""))
    five = _tiff(tmp / "five.tif", np.zeros((5, 16, 16), np.uint8), photometric="minisblack", planarconfig="separate")
    cases.append(("5-channel image", ["upscale", five, "--mpp", "1", *G, "-o", out], 1, "channels"))
    cases.append(("--mpp 0", ["upscale", good, "--mpp", "0", *G, "-o", out], 2, "mpp"))
    cases.append(("missing input", ["upscale", tmp / "nope.tif", "--mpp", "1", *G, "-o", out], 1, "not found"))
    # -- checkpoints --
    evil = tmp / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Evil()))
    cases.append(("pickle checkpoint", ["sample", "--model", evil, "-o", out], 1, "safetensors"))
    pth = tmp / "evil.pth"
    torch.save({"x": Evil()}, pth) if False else pth.write_bytes(pickle.dumps(Evil()))
    cases.append(("pickle .pth checkpoint", ["sample", "--model", pth, "-o", out], 1, "safetensors"))
    from safetensors.torch import load_file

    from wsigen.slides.checkpoint import read_config

    cfg = read_config(tiny)
    w = load_file(str(tiny))
    nan = {k: (v.clone().fill_(float("nan")) if i == 0 else v) for i, (k, v) in enumerate(w.items())}
    cases.append(("NaN weights", ["sample", "--model", _checkpoint_with(tmp / "nan.safetensors", nan, cfg),
                                  "-o", out], 1, "NaN"))
    wrong = {k: (torch.zeros(3, 3) if i == 0 else v) for i, (k, v) in enumerate(w.items())}
    cases.append(("shape mismatch", ["sample", "--model", _checkpoint_with(tmp / "shape.safetensors", wrong, cfg),
                                     "-o", out], 1, "match"))
    missing = {k: v for k, v in cfg.items() if k != "patch"}
    cases.append(("config missing fields", ["sample", "--model",
                                            _checkpoint_with(tmp / "miss.safetensors", w, missing), "-o", out], 1,
                  "missing"))
    absurd = {**cfg, "patch": -3, "mpp_range": [5, 1]}
    cases.append(("config absurd fields", ["sample", "--model",
                                           _checkpoint_with(tmp / "absurd.safetensors", w, absurd), "-o", out], 1,
                  "patch"))
    cases.append(("no config", ["sample", "--model", _checkpoint_with(tmp / "nocfg.safetensors", w, None),
                                "-o", out], 1, "config"))
    # -- stores --
    foreign = tmp / "foreign.zarr"
    g = zarr.open_group(str(foreign), mode="w", zarr_format=3)
    g.create_array("data", shape=(4, 4), dtype="uint8")
    cases.append(("foreign zarr store: export", ["export", foreign, "--format", "png", "-o", tmp / "f.png"], 1,
                  "wsigen"))
    cases.append(("foreign zarr store: resume", ["sample", "--resume", "-o", foreign], 1, "wsigen"))
    return cases


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A complete store, an incomplete one, and one with tampered attributes."""
    from wsigen import api

    d = tmp_path_factory.mktemp("stores")
    api.sample(d / "done.zarr", 64, model="gaussian", patch=32, steps=2, device="cpu")
    api.sample(d / "part.zarr", 64, model="gaussian", patch=32, steps=2, device="cpu")
    g = zarr.open_group(str(d / "part.zarr"), mode="r+")
    g.attrs["wsigen"] = {**g.attrs["wsigen"], "complete": False, "stages_complete": [0]}
    api.sample(d / "tamper.zarr", 64, model="gaussian", patch=32, steps=2, device="cpu")
    g = zarr.open_group(str(d / "tamper.zarr"), mode="r+")
    g.attrs["wsigen"] = {**g.attrs["wsigen"], "complete": False, "stages": "../../etc/passwd",
                         "stages_complete": "all"}
    return d


def _run(argv):
    r = CliRunner().invoke(app, [str(a) for a in argv])
    return r


def _check(r, code, word, out: Path | None = None):
    text = r.stderr
    assert r.exit_code == code, (r.exit_code, r.output, repr(r.exception))
    assert "Traceback" not in r.output and not isinstance(r.exception, Exception) or isinstance(
        r.exception, SystemExit)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("wsigen: "), text
    assert word.lower() in text.lower(), text
    if out is not None and out.exists():
        info = zarr.open_group(str(out), mode="r").attrs.get("wsigen", {})
        assert not info.get("complete"), "a failed run left a store that looks complete"


def test_hostile_table(tmp_path, tiny_model):
    cases = build_cases(tmp_path, tiny_model)
    assert len(cases) >= 17
    failures = []
    for n, (name, argv, code, word) in enumerate(cases):
        out = tmp_path / f"out{n}.zarr"
        argv = [out if str(a) == str(tmp_path / "out.zarr") else a for a in argv]
        r = _run(argv)
        try:
            _check(r, code, word, out)
        except AssertionError as e:
            failures.append(f"{name}: exit {r.exit_code}: {r.stderr.strip()[:300]!r} {str(e)[:200]}")
    assert not Path("/tmp/wsigen-pickle-was-executed").exists(), "a pickle was unpickled"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name,argv,code,word", [
    ("size 0", ["sample", *G, "--size", "0"], 2, "size"),
    ("size negative", ["sample", *G, "--size", "-64"], 2, "size"),
    ("size non-numeric", ["sample", *G, "--size", "big"], 2, "size"),
    ("size beyond the machine", ["sample", *G, "--size", "4000000", "--mpp", "0.05"], 1, "GB"),
    ("--workers 0", ["sample", *G, "--workers", "0"], 2, "workers"),
    ("--mpp 0", ["sample", *G, "--mpp", "0"], 2, "mpp"),
    ("--mpp nan", ["sample", *G, "--mpp", "nan"], 2, "mpp"),
    ("guided > steps", ["sample", *G, "--guided-steps", "3"], 2, "guided"),
])
def test_hostile_options(tmp_path, name, argv, code, word):
    out = tmp_path / "o.zarr"
    _check(_run([*argv, "-o", out]), code, word, out)
    if code:
        assert not out.exists() or name == "size beyond the machine"


def test_output_under_a_regular_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _check(_run(["sample", *G, "--size", "32", "-o", f / "out.zarr"]), 1, "not a directory")


def test_existing_output_without_overwrite(stores):
    _check(_run(["sample", *G, "--size", "64", "-o", stores / "done.zarr"]), 1, "--overwrite")


def test_resume_with_different_options(stores):
    _check(_run(["sample", "--resume", "--seed", "5", "-o", stores / "part.zarr"]), 2, "seed")


def test_export_incomplete_store(stores, tmp_path):
    _check(_run(["export", stores / "part.zarr", "--format", "png", "-o", tmp_path / "x.png"]), 1, "incomplete")
    assert not (tmp_path / "x.png").exists()


def test_tampered_store(stores, tmp_path):
    for argv in (["sample", "--resume", "-o", stores / "tamper.zarr"],
                 ["export", stores / "tamper.zarr", "--partial", "--format", "png", "-o", tmp_path / "t.png"],
                 ["info", stores / "tamper.zarr"]):
        r = _run(argv)
        assert r.exit_code == 1, (argv, r.output)
        assert "Traceback" not in r.output and r.stderr.startswith("wsigen: ")
    assert not Path("/etc/passwd.zarr").exists()
