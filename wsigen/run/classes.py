"""Class-conditional sampling: which class a request draws, checked against its model.

A request's ``class_name`` (one class, or "a,b" for a set of slides) and ``guidance`` w are
refused here, with one line, when the model cannot draw them: a class-free model, a class it
does not know, w ≠ 1 without a class-free call (label dropout 0), several classes for one slide.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import UsageError, WsigenError

if TYPE_CHECKING:
    from ..slides.checkpoint import LoadedModel

#: Request/SlideConfig field → store config name (stored, and keyed, only when set)
CLASS_FIELDS = {"class_name": "class", "guidance": "guidance"}


def check_guidance(w: float | None) -> None:
    """w, where given, is a finite number ≥ 0 (UsageError otherwise)."""
    if w is not None and not (w >= 0 and math.isfinite(w)):
        raise UsageError(f"--guidance must be a non-negative number (got {w:g})")


def class_choice(r, lm: LoadedModel) -> tuple[int | None, float | None]:
    """The class index and guidance w of a request (``config.Request``) against its model."""
    check_class(r, lm.config, lm.name)
    if r.class_name is None:
        return None, None
    w = 1.0 if r.guidance is None else float(r.guidance)
    return lm.class_label(r.class_name, w), w


def check_class(r, model_cfg: dict, model: str, count: int | None = None) -> None:
    """Refuse a class choice the model cannot draw, before any work (one line each)."""
    from ..slides.checkpoint import class_label  # torch: not in a launcher before it forks

    names = r.classes()
    if not names:
        if model_cfg.get("classes") and model_cfg.get("label_dropout") == 0:
            raise WsigenError(f"model {model} was trained with --label-dropout 0 and has no class-free "
                              f"call; choose a class with --class ({', '.join(model_cfg['classes'])})")
        return
    if len(names) > 1 and count is None:
        raise UsageError(f"--class {r.class_name}: several classes need --count K (slides cycle through them)")
    for n in names:
        class_label(model_cfg, n, 1.0 if r.guidance is None else r.guidance, model)
