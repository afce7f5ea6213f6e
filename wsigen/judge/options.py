"""What ``wsigen evaluate`` computes and how much of it: the options every part of the report reads."""

from __future__ import annotations

from dataclasses import dataclass

from ..slides.planes import Planes


@dataclass
class Options:
    """What to compute and how much of it (defaults are the command line's)."""

    mpps: list[float] | None = None  # µm/px of patch metrics; default: s_L × (1, 4, 16) that fit
    patch_size: int = 256
    patches: int = 256  # per slide set and µm/px
    training_patches: int = 10000  # at most, per µm/px, for the memorisation audit
    seed: int = 0
    device: str = "auto"
    batch: int = 16
    features: str | None = None
    features_arch: str = "auto"
    features_size: int | None = None  # network input side; default: the architecture's own
    stage_max_pixels: int = 2**26  # per stage for seams/guide; bigger stages are sampled in bands
    min_tissue: float = 0.5
    output_dir: str | None = None  # report.json and closest-pairs images
    reference_labels: str | None = None  # "folders" or a slide,label CSV: the references' classes
    slide_class: str | None = None  # compare with the references of this class (default: the store's)
    planes: Planes | None = None  # --page/--channels: the plane(s) of image inputs with several
