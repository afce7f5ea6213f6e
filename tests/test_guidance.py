"""Relaxed projection: A ū = y, A† = nearest upsampling = pinv(A), A A† = I."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsigen.method.guidance import avgpool, pinv, project


@pytest.mark.parametrize("k", [2, 3, 4])
def test_projection_matches_guide(k):
    g = torch.Generator().manual_seed(k)
    u = torch.randn(2, 3, 8 * k, 6 * k, generator=g)
    y = torch.randn(2, 3, 8, 6, generator=g)
    ubar = project(u, y, k)
    assert torch.allclose(avgpool(ubar, k), y, atol=1e-6)
    # ū is the closest such image: u − ū lies in the range of A† (constant on each k×k block).
    assert torch.allclose(ubar - u, pinv(avgpool(ubar - u, k), k), atol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_pinv_is_nearest_upsampling_and_right_inverse(k):
    y = torch.randn(1, 3, 5, 4)
    up = pinv(y, k)
    assert torch.equal(up, F.interpolate(y, scale_factor=k, mode="nearest"))
    assert torch.allclose(avgpool(up, k), y, atol=1e-7)  # A·A† = I


def test_pinv_equals_moore_penrose_of_explicit_matrix():
    k, h, w = 2, 3, 4
    n_in, n_out = (h * k) * (w * k), h * w
    A = np.zeros((n_out, n_in))
    for i in range(h):
        for j in range(w):
            for a in range(k):
                for b in range(k):
                    A[i * w + j, (i * k + a) * (w * k) + (j * k + b)] = 1 / k**2
    assert np.allclose(A @ A.T, np.eye(n_out) / k**2)
    y = np.random.default_rng(0).normal(size=(h, w))
    ref = (np.linalg.pinv(A) @ y.ravel()).reshape(h * k, w * k)
    got = pinv(torch.from_numpy(y)[None, None], k)[0, 0].numpy()
    assert np.allclose(ref, got)


def test_avgpool_refuses_misaligned():
    with pytest.raises(ValueError):
        avgpool(torch.zeros(1, 3, 5, 4), 2)
