"""Morphology-weighted loss: the nuclei mask of a patch stained with known H and E amounts, weights
(1 + α·m) of mean 1 per patch, α = 0 the plain EDM loss bit for bit, the stain-fit fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsigen.judge import stains
from wsigen.method import edm
from wsigen.slides import checkpoint, readers
from wsigen.training import data, loader, morphology, step


def stained(c_h: np.ndarray, c_e: float, stain: stains.StainModel = stains.REFERENCE) -> np.ndarray:
    """RGB uint8 of H and E concentrations: I = I₀·exp(−(c_H·h + c_E·e)) − 1 (stains.optical_density)."""
    od = c_h[..., None] * stain.he[:, 0] + c_e * stain.he[:, 1]
    return np.clip(np.rint(stain.io * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def nuclei_patch(side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Two round nuclei (c_H = 1.6) in stroma (c_H = 0.3), eosin 0.5 throughout; and the discs."""
    yy, xx = np.mgrid[:side, :side]
    disc = ((yy - 8) ** 2 + (xx - 9) ** 2 < 25) | ((yy - 22) ** 2 + (xx - 20) ** 2 < 36)
    return stained(np.where(disc, 1.6, 0.3), 0.5), disc


def test_haematoxylin_table_is_macenko_concentration():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    lut = morphology.haematoxylin_lut(stains.REFERENCE)
    h = lut[0][rgb[..., 0]] + lut[1][rgb[..., 1]] + lut[2][rgb[..., 2]]
    want = stains.concentrations(stains.optical_density(rgb).reshape(-1, 3), stains.REFERENCE.he)[:, 0]
    assert lut.dtype == np.float32
    np.testing.assert_allclose(h.reshape(-1), want, rtol=0, atol=2e-6)


def test_nuclei_mask_of_known_stain_amounts():
    rgb, disc = nuclei_patch()
    # threshold 0.5 × 1.9705 ≈ 0.99 lies between stroma (0.3) and nuclei (1.6), after uint8 rounding
    assert 0.3 < morphology.H_THRESHOLD * stains.REFERENCE.max_c[0] < 1.6
    m = morphology.nuclei_mask(rgb, stains.REFERENCE)
    assert m.dtype == np.uint8 and np.array_equal(m.astype(bool), disc)
    # a slide stained twice as strongly: its own (fitted) maximum doubles the threshold
    strong = stains.StainModel(stains.REFERENCE.he, stains.REFERENCE.max_c * 2)
    assert not morphology.nuclei_mask(rgb, strong).any()


@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_weights_mean_one_and_larger_on_nuclei(alpha):
    rgb, disc = nuclei_patch()
    masks = torch.from_numpy(np.stack([morphology.nuclei_mask(rgb, stains.REFERENCE),
                                       np.zeros(disc.shape, np.uint8)]))
    w = morphology.pixel_weights(masks, alpha)
    assert w.shape == (2, 1, 32, 32) and w.dtype == torch.float32
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2), rtol=0, atol=1e-6)
    f = disc.mean()  # closed form: (1 + α·m) / (1 + α·f)
    want = torch.from_numpy(np.where(disc, (1 + alpha) / (1 + alpha * f), 1 / (1 + alpha * f))).float()
    torch.testing.assert_close(w[0, 0], want, rtol=1e-6, atol=0)
    assert float(w[0, 0][torch.from_numpy(disc)].min()) > 1 > float(w[0, 0][~torch.from_numpy(disc)].max())
    assert torch.equal(w[1], torch.ones_like(w[1]))  # no nuclei: every weight 1


def _net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = checkpoint.build_denoiser(checkpoint.make_config(
            {"name": "unet", "width": 8, "mults": [1, 2], "blocks": 1, "attn_levels": [], "emb_freqs": 16,
             "dropout": 0.0}, patch=16))
        for p in net.parameters():  # the output layer starts at zero: give F something to say
            torch.nn.init.normal_(p, std=0.1)
    return net


def _batch(nuclei: bool = True) -> loader.Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    m = (torch.rand(4, 16, 16, generator=g) > 0.7).to(torch.uint8) if nuclei else None
    return loader.Batch(x, torch.tensor([1.0, 2.0, 4.0, 8.0]), None, m)


def test_alpha_zero_is_the_plain_loss_bit_for_bit(monkeypatch):
    net, batch = _net(), _batch()
    part = slice(0, 4)
    calls, real = [], edm.edm_loss
    monkeypatch.setattr(step.edm, "edm_loss", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    step.micro_loss(net, net.sigma_data, batch, part, torch.Generator().manual_seed(7), 0.0)
    assert calls == [{}]  # α = 0 passes no weight: the very call made before the option existed
    monkeypatch.undo()
    plain = edm.edm_loss(net, batch.x, batch.s, torch.Generator().manual_seed(7))
    for b in (batch, _batch(nuclei=False)):
        got = step.micro_loss(net, net.sigma_data, b, part, torch.Generator().manual_seed(7), 0.0)
        assert torch.equal(got, plain)
    # a weight of ones is the plain loss too, and α > 0 weights the squared error as promised
    ones = edm.edm_loss(net, batch.x, batch.s, torch.Generator().manual_seed(7),
                        pixel_weight=torch.ones(4, 1, 16, 16))
    assert torch.equal(ones, plain)
    weighted = step.micro_loss(net, net.sigma_data, batch, part, torch.Generator().manual_seed(7), 2.0)
    g = torch.Generator().manual_seed(7)
    sigma = (torch.randn(4, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(batch.x.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        d = net(batch.x + noise, sigma, batch.s)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    w = (1 + 2.0 * batch.nuclei.float()) / (1 + 2.0 * batch.nuclei.float()).mean(dim=(1, 2), keepdim=True)
    want = (lam.reshape(-1, 1, 1, 1) * w[:, None] * (d - batch.x) ** 2).mean()
    torch.testing.assert_close(weighted.detach(), want, rtol=1e-5, atol=0)
    assert not torch.equal(weighted, plain)


def test_stain_fit_falls_back_to_the_reference(tmp_path):
    import imagecodecs

    glass = tmp_path / "glass.png"  # no stained tissue: Macenko cannot fit
    glass.write_bytes(imagecodecs.png_encode(np.full((64, 64, 3), 238, np.uint8)))
    (sd,) = data.load_slides([glass], mpp=1.0, fit_stains=True)
    assert sd.stain is stains.REFERENCE and sd.stain_fallback
    from wsigen.errors import WsigenError

    with pytest.raises(WsigenError, match="cannot estimate stain vectors"):
        data.load_slides([glass], mpp=1.0, stain_ref="standard")


def test_patches_carry_their_nuclei_mask():
    rgb, _ = nuclei_patch(64)
    s = readers.ArraySlide(np.tile(rgb, (4, 4, 1)), 1.0)
    thumb = s.thumbnail(128)
    sd = data.SlideData(s, data.tissue_mask(thumb), 1.0, None, stains.fit_macenko(thumb))
    sampler = data.PatchSampler([sd], 32, 1.0, 2.0, nuclei=True)
    img, _, label, m = sampler.keyed_item(3, 0, 0, 1)
    assert label is None and np.array_equal(m, morphology.nuclei_mask(img, sd.stain))
    assert 0 < m.mean() < 0.5
    assert data.PatchSampler([sd], 32, 1.0, 2.0).keyed_item(3, 0, 0, 1)[3] is None
