"""What replacing ``slides.pixels.area_resize`` by Pillow's BOX resize would change (the
docs/architecture.md table "Hand-written parts a library could replace later").

    .venv/bin/python benchmarks/library_swaps.py

Prints, for a 2× reduction of a random 256 × 256 RGB image (seed 0), how many output values of
Pillow's ``Image.reduce(2)`` and ``resize(BOX)`` differ from ours, and the largest difference.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from wsigen.slides.pixels import area_resize


def main() -> None:
    a = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    ours = area_resize(a, (0, 0, 256, 256), 128, 128)
    for name, theirs in (("Image.reduce(2)", Image.fromarray(a).reduce(2)),
                         ("resize(BOX)", Image.fromarray(a).resize((128, 128), Image.Resampling.BOX))):
        t = np.asarray(theirs)
        d = np.abs(t.astype(int) - ours.astype(int))
        print(f"{name:16s} {int((d > 0).sum()):,} of {d.size:,} values differ, at most {int(d.max())} "
              "grey level(s)")


if __name__ == "__main__":
    main()
