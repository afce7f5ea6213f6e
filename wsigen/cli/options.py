"""Options shared by several commands (typer annotations)."""

from __future__ import annotations

from typing import Annotated

import typer

ClassOption = Annotated[str | None, typer.Option(
    "--class", help="Tissue class of a class-conditional model (wsigen model info lists them); with "
                    "--count, comma-separated classes the slides cycle through.")]
GuidanceOption = Annotated[float | None, typer.Option(
    help="Classifier-free guidance w: D_∅ + w·(D_c − D_∅) at every stage (1: the class model alone, "
         "one evaluation; other w: two per call, in one batched pass) [default: 1].", min=0)]
