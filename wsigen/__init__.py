"""wsigen: gigapixel synthetic H&E whole-slide images with guided, grid-shifted diffusion."""

__version__ = "0.1.0"


def __getattr__(name):  # the API imports torch; keep `import wsigen` light until it is used
    if name in ("sample", "export", "info", "plan", "upscale"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
