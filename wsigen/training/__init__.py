"""Training a denoiser on real slides: patch sampler (``data``), loop (``loop``), figure (``plot``).

``loop`` (and torch) load on first use, so ``python -m wsigen.training.plot`` starts quickly.
"""

__all__ = ["TrainConfig", "loss_history", "train"]


def __getattr__(name: str):
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
