"""Class-conditional training: labels into the checkpoint and train-state, class-balanced keyed
class draws and label dropout (the same for any number of loader workers), exact resume, resume
with changed labels refused, --init-from across class-free and labelled models, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from clitools import invoke
from safetensors.torch import load_file
from test_train import synthetic_slide

from wsigen.errors import UsageError
from wsigen.judge import stains
from wsigen.method.classfree import NO_CLASS
from wsigen.slides import checkpoint, readers
from wsigen.training import TrainConfig, data, keyed, loader, morphology, train

TINY = dict(patch=16, width=8, mults=(1, 2), batch=4, lr=2e-3, lr_warmup=1, preview_every=0,
            checkpoint_every=1000, slide_mpp=1.0, sample_steps=4, seed=3, device="cpu", loader_workers=0)
CLASS_EMB = "net.class_emb.weight"


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """slides/normal/{a,b}.png and slides/tumour/c.png: 128² synthetic H&E at 1 µm/px."""
    root = tmp_path_factory.mktemp("labelled") / "slides"
    for name, seed in (("normal/a.png", 0), ("normal/b.png", 1), ("tumour/c.png", 2)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(imagecodecs.png_encode(synthetic_slide(128, seed)))
    return root


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_labels_reach_checkpoint_state_and_model_info(tmp_path, slides):
    """The issue's `wsigen train DIR --labels folders … -o m`, then `wsigen model info m`."""
    out = tmp_path / "m"
    r = invoke("train", slides, "--labels", "folders", "--max-steps", "2", "-o", out, "--patch", "16",
               "--width", "8", "--mults", "1,2", "--batch", "2", "--mpp", "1", "--sample-steps", "3",
               "--preview-every", "2", "--loader-workers", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    cfg = checkpoint.load_model(out).config
    assert cfg["classes"] == ["normal", "tumour"] and cfg["class_slides"] == [2, 1]
    assert cfg["label_dropout"] == 0.1 and cfg["arch"]["classes"] == 2
    assert cfg["training"]["labels"] == "folders" and "morphology_weight" not in cfg["training"]
    state = json.loads((out / "train-state" / "state.json").read_text())
    assert state["labels"] == {"source": "folders", "classes": ["normal", "tumour"],
                               "slides": ["normal", "normal", "tumour"]}
    assert state["config"]["labels"] == "folders" and state["config"]["label_dropout"] == 0.1
    # the preview shows one row per class
    png = imagecodecs.png_decode((out / "preview.png").read_bytes())
    assert png.shape[0] == 2 * (16 + 2) + 2
    r = invoke("model", "info", out)
    assert r.exit_code == 0 and '["normal", "tumour"]' in r.stdout and "class_slides" in r.stdout


def _array_slide(tissue_cols: int, seed: int) -> data.SlideData:
    """A 128² slide whose left ``tissue_cols`` columns are tissue (the rest glass)."""
    img = synthetic_slide(128, seed)
    img[:, tissue_cols:] = (240, 238, 245)
    s = readers.ArraySlide(img, 1.0)
    thumb = s.thumbnail(128)
    mask = data.tissue_mask(thumb)
    return data.SlideData(s, mask, 1.0, None, stains.fit_macenko(thumb))


def _sampler(nuclei: bool = False) -> data.PatchSampler:
    # class 0: two slides with much tissue; class 1: one with a sliver (area-proportional: ~10 %)
    sds = [_array_slide(64, 0), _array_slide(64, 1), _array_slide(12, 2)]
    return data.PatchSampler(sds, 16, 1.0, 4.0, classes=[0, 0, 1], nuclei=nuclei)


def test_class_draws_are_balanced_and_each_patch_has_its_slides_class():
    sampler = _sampler()
    area = sampler._weights / sampler._weights.sum()
    assert area[2] < 0.15  # what drawing by tissue area alone would give class 1
    n, got = 1200, []
    for i in range(n):
        img, s, slide = sampler.draw(keyed.patch_rng(0, 0, 0, i))
        _, _, label, _ = sampler.keyed_item(0, 0, 0, i)
        assert label == sampler.classes[slide]
        got.append(label)
    share = np.mean(got)
    assert abs(share - 0.5) < 5 * np.sqrt(0.25 / n)  # balanced: each class half of the patches
    # within class 0, slides by tissue area: equal areas → about half each
    # (and the same key gives the same draw)
    assert sampler.keyed_item(0, 4, 1, 7)[2] == sampler.keyed_item(0, 4, 1, 7)[2]


def test_class_free_sampler_draws_what_it_drew_before():
    sds = [_array_slide(64, 0), _array_slide(12, 2)]
    free = data.PatchSampler(sds, 16, 1.0, 4.0)
    for i in range(5):
        img, s = free.keyed_patch(1, 2, 0, i)
        img2, s2, label, nuclei = free.keyed_item(1, 2, 0, i, label_dropout=0.5)
        assert np.array_equal(img, img2) and s == s2 and label is None and nuclei is None


def test_label_dropout_is_keyed_bernoulli():
    p, n = 0.1, 20000
    drops = [keyed.label_dropped(5, t, r, i, p) for t in range(10) for r in range(2) for i in range(n // 20)]
    assert abs(np.mean(drops) - p) < 5 * np.sqrt(p * (1 - p) / n)
    again = [keyed.label_dropped(5, t, r, i, p) for t in range(10) for r in range(2) for i in range(n // 20)]
    assert drops == again  # exactly reproducible: a function of the key
    other = [keyed.label_dropped(6, t, r, i, p) for t in range(10) for r in range(2) for i in range(n // 20)]
    assert drops != other
    assert not any(keyed.label_dropped(5, 0, 0, i, 0.0) for i in range(1000))


def _batches(workers: int, stop: int = 3):
    b = loader.Batches(_sampler(nuclei=True), 7, 0, 6, 0, stop, workers, "cpu", label_dropout=0.3)
    try:
        return [next(b) for _ in range(stop)]
    finally:
        b.close()


def test_labels_and_masks_are_the_same_for_0_1_2_loader_workers():
    ref = _batches(0)
    labels = torch.cat([b.labels for b in ref])
    assert labels.dtype == torch.long and set(labels.tolist()) <= {NO_CLASS, 0, 1}
    for j, b in enumerate(ref):  # −1 exactly where the key drops the label
        for i in range(6):
            assert (int(b.labels[i]) == NO_CLASS) == keyed.label_dropped(7, j, 0, i, 0.3)
    assert b.nuclei.shape == (6, 16, 16) and b.nuclei.dtype == torch.uint8
    # each mask is the nuclei mask of its own (clean) patch
    img = ((b.x[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    sampler = _sampler()
    _, _, slide = sampler.draw(keyed.patch_rng(7, 2, 0, 0))
    assert np.array_equal(b.nuclei[0].numpy(), morphology.nuclei_mask(img, sampler.slides[slide].stain))
    for workers in (1, 2):
        for got, want in zip(_batches(workers), ref, strict=True):
            for a, w in zip(got, want, strict=True):
                assert torch.equal(a, w)


def test_resume_is_exact_with_labels_and_morphology_weight(tmp_path, slides):
    opts = {**TINY, "labels": "folders", "label_dropout": 0.5, "morphology_weight": 1.5, "log_every": 1}
    a, b = tmp_path / "a", tmp_path / "b"
    train([slides], a, max_steps=4, progress=False, **opts)
    train([slides], b, max_steps=2, progress=False, **opts)
    summary = train([slides], b, resume=True, max_steps=4, loader_workers=2, progress=False)
    assert summary["steps_this_run"] == 2
    for name in ("train-state/model.safetensors", "train-state/ema.safetensors",
                 "train-state/optimizer.safetensors", "model.safetensors"):
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_resume_with_changed_labels_is_refused_and_writes_nothing(tmp_path, slides):
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\na.png,normal\nb.png,normal\nc.png,tumour\n")
    out = tmp_path / "run"
    train([slides], out, max_steps=1, labels=str(csv), progress=False, **TINY)
    before = _files(out)
    csv.write_text("slide,label\na.png,normal\nb.png,tumour\nc.png,tumour\n")  # b changes class
    with pytest.raises(UsageError, match="changed labels: slide b.png was 'normal' in the saved run, now 'tumour'"):
        train([slides], out, resume=True, max_steps=2)
    csv.write_text("slide,label\na.png,normal\nb.png,stroma\nc.png,tumour\n")  # another class list
    with pytest.raises(UsageError, match="other classes than the saved run"):
        train([slides], out, resume=True, max_steps=2)
    with pytest.raises(UsageError, match="labels \\(saved"):  # another label source
        train([slides], out, resume=True, max_steps=2, labels="folders")
    assert _files(out) == before
    csv.write_text("slide,label\na.png,normal\nb.png,normal\nc.png,tumour\n")
    assert train([slides], out, resume=True, max_steps=2, progress=False)["step"] == 2


def test_init_from_class_free_and_labelled_models(tmp_path, slides):
    free, lab = tmp_path / "free", tmp_path / "lab"
    train([slides], free, max_steps=1, progress=False, **TINY)
    # a labelled run from the class-free model: every weight, and the class embedding at zero
    train([slides], lab, max_steps=0, labels="folders", init_from=str(free), progress=False, **TINY)
    f, g = _tensors(free / "model.safetensors"), _tensors(lab / "model.safetensors")
    assert set(g) - set(f) == {CLASS_EMB} and set(f) <= set(g)
    assert all(torch.equal(f[k], g[k]) for k in f)
    assert g[CLASS_EMB].shape == (2, 4 * 16) and not g[CLASS_EMB].any()
    loaded = checkpoint.load_model(lab)
    assert "class embedding started at zero" in loaded.config["training_data"]
    # so at first each class's call is the class-free call
    x, sig, mpp = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.tensor([1.0, 3.0])
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, sig, mpp, torch.tensor([0, 1])),
                           checkpoint.load_model(free).denoiser(x, sig, mpp))
    # a labelled model into a run with the same classes: everything
    train([slides], lab, max_steps=1, labels="folders", overwrite=True, progress=False, **TINY)
    again = tmp_path / "again"
    train([slides], again, max_steps=0, labels="folders", init_from=str(lab), progress=False, **TINY)
    h, g = _tensors(again / "model.safetensors"), _tensors(lab / "model.safetensors")
    assert h.keys() == g.keys() and all(torch.equal(h[k], g[k]) for k in g) and g[CLASS_EMB].any()
    # … into a class-free run: everything but the class embedding
    dropped = tmp_path / "dropped"
    train([slides], dropped, max_steps=0, init_from=str(lab), progress=False, **TINY)
    d = _tensors(dropped / "model.safetensors")
    assert set(d) == set(g) - {CLASS_EMB} and all(torch.equal(d[k], g[k]) for k in d)
    # … into a run with other classes: refused, nothing written
    csv = tmp_path / "other.csv"
    csv.write_text("a.png,x\nb.png,y\nc.png,y\n")
    with pytest.raises(UsageError, match=r"its classes \(normal, tumour\) differ from this run's labels \(x, y\)"):
        train([slides], tmp_path / "other", max_steps=0, labels=str(csv), init_from=str(lab), **TINY)
    assert not (tmp_path / "other").exists()


def test_label_options_in_the_config():
    assert TrainConfig().label_dropout is None and TrainConfig().morphology_weight == 0
    cfg = TrainConfig(labels=Path("l.csv"))
    assert cfg.labels == "l.csv" and cfg.label_dropout == 0.1
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.from_json({"seed": 1}).labels is None  # a state written before labels


@pytest.mark.parametrize("setup, args, msg", [
    ("csv-missing-row", [], "slide .*c.png has no label"),
    ("csv-missing-slide", [], "line 4: slide 'gone.png' is not among the slides given"),
    ("one-class", [], "needs at least two classes"),
    ("folders", ["--label-dropout", "1"], r"--label-dropout must lie in \[0, 1\)"),
    ("folders", ["--label-dropout", "-0.1"], r"--label-dropout must lie in \[0, 1\)"),
    (None, ["--label-dropout", "0.2"], "--label-dropout needs --labels"),
    ("folders", ["--morphology-weight", "-1"], "--morphology-weight must be a finite number ≥ 0"),
    ("csv-none", [], "label file not found"),
])
def test_bad_label_input_is_one_line_exit_2_nothing_written(tmp_path, slides, setup, args, msg):
    roots, labels = [slides], []
    csv = tmp_path / "labels.csv"
    if setup == "csv-missing-row":
        csv.write_text("a.png,normal\nb.png,normal\n")
    elif setup == "csv-missing-slide":
        csv.write_text("slide,label\na.png,n\nb.png,n\ngone.png,t\nc.png,t\n")
    if setup and setup.startswith("csv"):
        labels = ["--labels", csv]
    elif setup == "one-class":
        roots, labels = [slides / "normal"], ["--labels", "folders"]
    elif setup == "folders":
        labels = ["--labels", "folders"]
    out = tmp_path / "out"
    r = invoke("train", *roots, "-o", out, *labels, *args, "--patch", "16", "--width", "8", "--mults", "1,2",
               "--mpp", "1", "--max-steps", "1", "--device", "cpu")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsigen: "), r.stderr
    import re

    assert re.search(msg, lines[0]), lines[0]
    assert not out.exists()


def test_all_labels_dropped_still_uses_the_class_embedding_in_training():
    """DDP fails a step in which a parameter gets no gradient: with every label of a micro-batch
    dropped, training mode still routes through the class embedding (adding zeros)."""
    from wsigen.nets import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(width=8, mults=(1, 2), classes=2))
    torch.nn.init.normal_(net.out.weight, std=0.1)  # zero at first: F ≡ 0 would prove nothing
    x, c, m = torch.randn(2, 3, 16, 16), torch.tensor([0.1, -0.3]), torch.tensor([0.0, 1.0])
    none = torch.full((2,), NO_CLASS)
    with torch.no_grad():
        want = net.eval()(x, c, m)
    out = net.train()(x, c, m, none)
    assert torch.equal(out.detach(), want)  # still exactly the class-free call
    out.square().sum().backward()
    assert net.class_emb.weight.grad is not None and not net.class_emb.weight.grad.any()


def test_preview_rows_share_their_noise():
    """Class rows of a preview start from the same noise: one class in every row gives equal rows,
    two classes different ones."""
    import torch

    from wsigen.method.edm import EDMPrecond, Schedule
    from wsigen.nets import UNet, UNetConfig
    from wsigen.training.sampling import sample_patches

    torch.manual_seed(0)
    net = EDMPrecond(UNet(UNetConfig(width=8, mults=(1, 2), classes=2))).eval()
    for p in net.parameters():
        if not p.detach().any():
            torch.nn.init.normal_(p, std=0.05)
    mpps = [1.0, 2.0] * 2

    def run(classes):
        g = torch.Generator().manual_seed(5)
        return sample_patches(net, mpps, 16, Schedule(3), g, "cpu", classes, repeat=2)
    same = run([0, 0, 0, 0])
    assert torch.equal(same[:2], same[2:])
    diff = run([0, 0, 1, 1])
    assert torch.equal(diff[:2], same[:2]) and not torch.equal(diff[2:], same[2:])
