"""Metrics against closed forms; feature networks against torchvision's parameter names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsigen.errors import WsigenError
from wsigen.judge import metrics

# -- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_1d_closed_form():
    # (μ₁ − μ₂)² + (σ₁ − σ₂)² for one dimension
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_frechet_diagonal_and_rotated():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # the distance is invariant under a common rotation, which makes both covariances non-diagonal
    r, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    got = metrics.frechet_distance(r @ mu1, r @ np.diag(a) @ r.T, r @ mu2, r @ np.diag(b) @ r.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_non_commuting_scaled_and_identical():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 8))
    s = x @ x.T + 0.1 * np.eye(8)
    assert metrics.frechet_distance(np.zeros(8), s, np.zeros(8), s) == pytest.approx(0, abs=1e-8)
    # Σ₂ = c²Σ₁: tr(Σ₁ + c²Σ₁ − 2cΣ₁) = (1 − c)² tr Σ₁
    assert metrics.frechet_distance(np.zeros(8), s, np.zeros(8), 4 * s) == pytest.approx(np.trace(s))


def test_fid_of_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, (20000, 3))
    fake = rng.normal(0.5, 2, (20000, 3))
    expected = 3 * 0.5**2 + 3 * (2 - 1) ** 2
    assert metrics.fid(real, fake) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("n1, n2", [(10, 30), (30, 12), (60, 70)])
def test_low_rank_fid_equals_covariance_formula(n1, n2):
    rng = np.random.default_rng(n1)
    real, fake = rng.normal(size=(n1, 50)), rng.normal(0.3, 1.5, size=(n2, 50)) @ rng.normal(size=(50, 50))
    expected = metrics.frechet_distance(*metrics.mean_cov(real), *metrics.mean_cov(fake))
    assert metrics.fid(real, fake) == pytest.approx(expected, rel=1e-8)


# -- KID ----------------------------------------------------------------------------------------


def _poly_k(p, q):
    """E k(x, y) for k = (xy + 1)³, x ~ N(μp, sp²), y ~ N(μq, sq²) independent (d = 1)."""
    (mp, sp), (mq, sq) = p, q

    def m(mu, s):
        return mu, mu**2 + s**2, mu**3 + 3 * mu * s**2

    a, b = m(mp, sp), m(mq, sq)
    return a[2] * b[2] + 3 * a[1] * b[1] + 3 * a[0] * b[0] + 1


def test_kid_same_distribution_is_near_zero_and_shift_matches_closed_form():
    rng = np.random.default_rng(3)
    p, q = (0.0, 0.5), (0.5, 0.5)  # closed form 1.1875
    x = rng.normal(*p, (4000, 1))
    y = rng.normal(*p, (4000, 1))
    z = rng.normal(*q, (4000, 1))
    expected = _poly_k(p, p) + _poly_k(q, q) - 2 * _poly_k(p, q)
    same, _ = metrics.kid(x, y, subsets=8, subset_size=1000)
    shifted, _ = metrics.kid(x, z, subsets=8, subset_size=1000)
    assert abs(same) < 0.01 * expected
    assert shifted == pytest.approx(expected, rel=0.12)


def test_mmd_of_point_masses_is_exact():
    a, b = np.ones((5, 4)), np.full((7, 4), 2.0)
    k = lambda u, v: (u @ v / 4 + 1) ** 3  # noqa: E731
    expected = k(a[0], a[0]) + k(b[0], b[0]) - 2 * k(a[0], b[0])
    assert metrics.mmd2_unbiased(a, b) == pytest.approx(expected)


# -- precision and recall -----------------------------------------------------------------------


def test_precision_recall_identical_disjoint_and_half():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(200, 8))
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    # half of the fakes are the reals, half lie far away: precision ½; the reals are all covered
    mixed = np.concatenate([real, far])
    p, r = metrics.precision_recall(real, mixed)
    assert p == 0.5 and r == 1.0


def test_knn_radii_exclude_the_sample_itself():
    x = np.array([[0.0], [1.0], [3.0], [6.0]])
    assert metrics.knn_radii(x, k=1).tolist() == [1, 1, 2, 3]
    with pytest.raises(ValueError):
        metrics.knn_radii(x, k=4)


# -- seams, pooling, histograms -----------------------------------------------------------------


def _noise(shape, seed=0, sd=10.0):
    return np.random.default_rng(seed).normal(128, sd, shape)


def test_seam_score_sees_seams_on_the_grid_only():
    img = _noise((3, 128, 96))
    assert metrics.seam_score(img, (0, 0), 32) == pytest.approx(1, abs=0.08)
    seamy = img.copy()
    # patches of a fixed grid with independent brightness offsets: jumps at multiples of 32
    offsets = np.random.default_rng(1).normal(0, 15, (4, 3))
    seamy += np.kron(offsets, np.ones((32, 32)))[None]
    assert metrics.seam_score(seamy, (0, 0), 32) > 1.25
    assert metrics.seam_score(seamy, (16, 16), 32) == pytest.approx(1, abs=0.1)


def test_seam_score_is_not_fooled_by_nested_guide_blocks():
    # what a pixel-wise model gives after three guided stages: blocks of 2, 4, 8 px, no seams
    rng = np.random.default_rng(2)
    img = sum(np.kron(rng.normal(0, 10, (3, 128 // b, 128 // b)), np.ones((1, b, b))) for b in (1, 2, 4, 8))
    c = metrics.SeamCounter(128, 128, 32, {"g": (0, 0)}, k=2, levels=3)
    c.add(img, 0)
    s = c.scores()["g"]
    assert s["score"] == pytest.approx(1, abs=0.1)
    assert s["score_all_pairs"] > 1.4  # the plain ratio would report seams that are not there


@pytest.mark.parametrize("band", [1, 7, 32, 128])
def test_seam_counter_streams_bands_exactly(band):
    img = np.clip(_noise((3, 128, 80), seed=5), 0, 255).astype(np.uint8)
    whole = metrics.SeamCounter(128, 80, 32, {"a": (0, 0), "b": (6, 10)}, k=2, levels=2)
    whole.add(img, 0)
    parts = metrics.SeamCounter(128, 80, 32, {"a": (0, 0), "b": (6, 10)}, k=2, levels=2)
    for y in range(0, 128, band):
        parts.add(img[:, y : y + band], y)
    a, b = parts.scores(), whole.scores()
    for g in ("a", "b"):
        assert a[g].pop("lines") == b[g].pop("lines")
        assert a[g] == b[g]


def test_grid_lines_and_block_order():
    assert metrics.grid_lines(100, 0, 32).tolist() == [32, 64, 96]
    assert metrics.grid_lines(100, 6, 32).tolist() == [6, 38, 70]
    assert metrics.block_order(np.arange(1, 9), 2, 2).tolist() == [0, 1, 0, 2, 0, 1, 0, 2]


def test_avgpool_and_psnr():
    a = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    assert metrics.avgpool(a, 2).tolist() == [[[2.5, 4.5], [10.5, 12.5]]]
    assert metrics.psnr(255.0**2) == pytest.approx(0)
    assert metrics.psnr(0) == np.inf


def test_histogram_distances():
    bins = np.linspace(0, 10, 1001)
    rng = np.random.default_rng(6)
    a = rng.uniform(2, 5, 100000)
    assert metrics.wasserstein1(a, a + 1.5, bins) == pytest.approx(1.5, abs=0.02)
    h = np.array([0, 5, 5, 0])
    assert metrics.hist_js(h, h) == 0
    assert metrics.hist_js(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1)
    assert metrics.angle_deg([1, 0, 0], [0, 1, 0]) == pytest.approx(90)


# -- feature networks ---------------------------------------------------------------------------

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _basic(prefix):
    return [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{p}" for p in BN]


def torchvision_inception_keys(aux: bool = True) -> list[str]:
    """torchvision.models.Inception3().state_dict() names, written from its definition."""
    keys = []
    for n in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"):
        keys += _basic(n)
    a = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
         "branch3x3dbl_3", "branch_pool"]
    b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    c = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
         "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
    d = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
    e = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
         "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
    blocks = [("Mixed_5b", a), ("Mixed_5c", a), ("Mixed_5d", a), ("Mixed_6a", b), ("Mixed_6b", c),
              ("Mixed_6c", c), ("Mixed_6d", c), ("Mixed_6e", c)]
    for name, branches in blocks:
        keys += [k for br in branches for k in _basic(f"{name}.{br}")]
    if aux:
        keys += _basic("AuxLogits.conv0") + _basic("AuxLogits.conv1") + ["AuxLogits.fc.weight", "AuxLogits.fc.bias"]
    for name, branches in (("Mixed_7a", d), ("Mixed_7b", e), ("Mixed_7c", e)):
        keys += [k for br in branches for k in _basic(f"{name}.{br}")]
    return keys + ["fc.weight", "fc.bias"]


def torchvision_resnet50_keys() -> list[str]:
    keys = ["conv1.weight"] + [f"bn1.{p}" for p in BN]
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for i in range(blocks):
            pre = f"layer{layer}.{i}"
            for j in (1, 2, 3):
                keys += [f"{pre}.conv{j}.weight"] + [f"{pre}.bn{j}.{p}" for p in BN]
            if i == 0:
                keys += [f"{pre}.downsample.0.weight"] + [f"{pre}.downsample.1.{p}" for p in BN]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def inception():
    from wsigen.nets.inception import Inception3

    torch.manual_seed(0)
    return Inception3().eval()


def test_inception_names_match_torchvision(inception):
    keys = list(inception.state_dict())
    assert keys == torchvision_inception_keys()
    assert len(keys) == 580
    # torchvision documents 27,161,264 parameters for inception_v3
    assert sum(p.numel() for p in inception.parameters()) == 27_161_264


def test_resnet50_names_match_torchvision():
    from wsigen.nets.resnet import ResNet50

    net = ResNet50()
    assert list(net.state_dict()) == torchvision_resnet50_keys()
    assert len(net.state_dict()) == 320
    assert sum(p.numel() for p in net.parameters()) == 25_557_032  # torchvision's resnet50


def test_networks_run_and_give_2048_features(inception):
    from wsigen.nets.resnet import ResNet50

    with torch.no_grad():
        x = torch.rand(2, 3, 80, 80) * 255
        inception.input_size = 80
        f = inception(inception.prepare(x))
        assert f.shape == (2, 2048) and torch.isfinite(f).all()
        r = ResNet50().eval()
        r.input_size = 64
        g = r(r.prepare(x))
        assert g.shape == (2, 2048) and torch.isfinite(g).all()


def test_fid_variant_differs_only_in_pooling(inception):
    from wsigen.nets.inception import Inception3

    fid = Inception3(num_classes=1000, fid=True).eval()
    fid.load_state_dict(inception.state_dict())
    x = torch.rand(1, 3, 80, 80) * 255
    with torch.no_grad():
        inception.input_size = fid.input_size = 80
        a, b = inception(inception.prepare(x)), fid(fid.prepare(x))
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_load_fid_weights_safetensors_and_pth(tmp_path, inception):
    """pytorch-fid's file: torchvision names, 1008 classes, no AuxLogits; a .pth with 'module.'."""
    from safetensors.torch import save_file

    from wsigen.judge.features import load_feature_net

    state = {k: v.half() if v.is_floating_point() else v for k, v in inception.state_dict().items()
             if not k.startswith(("AuxLogits", "fc."))}
    state["fc.weight"] = torch.zeros(1008, 2048, dtype=torch.half)
    state["fc.bias"] = torch.zeros(1008, dtype=torch.half)
    save_file(state, str(tmp_path / "fid.safetensors"))
    net, info = load_feature_net(tmp_path / "fid.safetensors")
    assert info["arch"] == "inception-fid" and info["input_size"] == 299 and net.fid
    w = net.state_dict()["Mixed_7c.branch_pool.conv.weight"]
    assert torch.equal(w, inception.state_dict()["Mixed_7c.branch_pool.conv.weight"].half().float())

    from wsigen.nets.resnet import ResNet50

    torch.save({"state_dict": {f"module.{k}": v for k, v in ResNet50().state_dict().items()}},
               tmp_path / "r50.pth")
    _, info = load_feature_net(tmp_path / "r50.pth", input_size=64)
    assert info["arch"] == "resnet50" and info["input_size"] == 64


def test_load_feature_net_refuses_wrong_or_unsafe_files(tmp_path):
    from safetensors.torch import save_file

    from wsigen.judge.features import load_feature_net
    from wsigen.nets.resnet import ResNet50

    state = ResNet50().state_dict()
    del state["layer4.2.conv3.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WsigenError, match="no supported architecture"):
        load_feature_net(tmp_path / "broken.safetensors")
    with pytest.raises(WsigenError, match="missing"):
        load_feature_net(tmp_path / "broken.safetensors", arch="resnet50")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module object: pickle
    with pytest.raises(WsigenError, match="weights_only"):
        load_feature_net(tmp_path / "pickled.pth")
    with pytest.raises(WsigenError, match="not found"):
        load_feature_net(tmp_path / "nope.pth")
