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
