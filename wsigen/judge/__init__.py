"""Judging slides: evaluation reports, metrics, previews and stain statistics."""

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (what, done, total): how a judge reports how far it is
