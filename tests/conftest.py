"""Shared fixtures: tiny networks and quiet progress bars."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WSIGEN_NO_PROGRESS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small untrained convolutional UNet checkpoint (patch 32): shows batch/seam/boundary effects."""
    from wsigen.slides.checkpoint import init_model

    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    init_model(path, {"width": 8, "mults": [1, 2]}, seed=1, patch=32, steps=6, guided_steps=4,
               mpp_range=[0.25, 256.0], recommended_size=128, final_mpp=1.0)
    return path


# The exported test slide of test_export.py and test_dicom.py (each module makes its own copy).
@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """1300 × 1000 px of tissue-like pixels at 0.25 µm/px (seed 5), chunks 256, four levels down
    to ≤ 256 px (the last one odd: 163 × 125)."""
    from test_store import make_store

    return make_store(tmp_path_factory.mktemp("slide") / "slide.zarr", 1300, 1000, chunk=256,
                      min_side=256, mpp=0.25, seed=5)


@pytest.fixture(scope="module")
def levels(slide):
    """The slide's levels as (H, W, 3)."""
    import numpy as np

    return [np.asarray(slide.level_array(i)[:]).transpose(1, 2, 0) for i in range(4)]

