"""Training a denoiser on real slides.

``config`` (TrainConfig, TrainOptions), ``data`` (patch sampler), ``loop`` (train), ``state``
(train-state on disk), ``keyed`` (keyed RNG), ``sampling`` (previews), ``progress`` (the bar),
``log`` (loss.jsonl) and ``plot`` (the loss figure).

Names load on first use (torch with them), so ``python -m wsigen.training.plot`` starts quickly.
"""

__all__ = ["TrainConfig", "TrainOptions", "arch_options", "loss_history", "train"]

_WHERE = {"TrainConfig": "config", "TrainOptions": "config", "arch_options": "config",
          "loss_history": "log", "train": "loop"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
