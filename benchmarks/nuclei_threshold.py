"""The nuclei threshold of the morphology-weighted loss (docs/training.md), measured on real H&E:
the share of tissue pixels the mask marks at several thresholds, on tests/data/cmu_small_region.svs.

    .venv/bin/python benchmarks/nuclei_threshold.py [--slide FILE] [--thresholds 0.4,0.5,0.7]

The stain vectors are fitted once on the slide's 1024-px thumbnail, as training does
(``training.data.load_slides(fit_stains=True)``); the mask is ``training.morphology.nuclei_mask``
with its threshold set to each value in turn; tissue is ``training.data.tissue_mask``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsigen.training import data, morphology

SVS = Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default=str(SVS))
    ap.add_argument("--thresholds", default="0.4,0.5,0.7")
    a = ap.parse_args()
    (sd,) = data.load_slides([a.slide], fit_stains=True)
    s = sd.slide
    rgb = s.read_scaled(0, 0, s.width, s.height, s.width, s.height)
    tissue = data.tissue_mask(rgb)
    lut = morphology.haematoxylin_lut(sd.stain)
    print(f"{Path(a.slide).name}: {s.width}x{s.height} px, {tissue.mean():.1%} tissue, stain fit "
          f"{'failed (reference used)' if sd.stain_fallback else 'ok'}, H max {sd.stain.max_c[0]:.3f}")
    default = morphology.H_THRESHOLD
    for t in (float(v) for v in a.thresholds.split(",")):
        morphology.H_THRESHOLD = t
        m = morphology.nuclei_mask(rgb, sd.stain, lut).astype(bool)
        mark = " (the default)" if t == default else ""
        print(f"  threshold {t:g} × H max: {m[tissue].mean():.1%} of tissue pixels are nuclei{mark}")
    morphology.H_THRESHOLD = default


if __name__ == "__main__":
    main()
