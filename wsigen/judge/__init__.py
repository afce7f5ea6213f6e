"""Judging slides: evaluation reports, metrics, previews and stain statistics."""
