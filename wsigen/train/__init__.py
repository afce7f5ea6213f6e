"""Training a denoiser on real slides: patch sampler (``data``) and loop (``loop``)."""

from .loop import TrainConfig, loss_history, train

__all__ = ["TrainConfig", "loss_history", "train"]
