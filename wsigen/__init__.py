"""wsigen: gigapixel synthetic H&E whole-slide images with guided, grid-shifted diffusion.

The public API (``docs/api.md``): ``sample``, ``upscale``, ``export``, ``train``, ``plan``, ``info``,
``preview``, ``evaluate``. They live in ``wsigen.api`` and load on first use, so ``import wsigen``
stays light (the API imports torch).
"""

from .version import __version__  # noqa: F401

__all__ = ["sample", "upscale", "export", "train", "plan", "info", "preview", "evaluate"]


def __getattr__(name):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
