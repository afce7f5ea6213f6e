"""Denoiser networks F(x; c_noise, log s) and the analytic Gaussian denoiser."""

from .gaussian import GaussianDenoiser
from .unet import UNet, UNetConfig

__all__ = ["GaussianDenoiser", "UNet", "UNetConfig"]
