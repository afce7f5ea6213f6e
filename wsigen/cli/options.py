"""Options shared by several commands (typer annotations): the schedule (sample, upscale, plan)
and the class of a class-conditional model (sample, upscale)."""

from __future__ import annotations

from typing import Annotated

import typer

ClassOption = Annotated[str | None, typer.Option(
    "--class", help="Tissue class of a class-conditional model (wsigen model info lists them); with "
                    "--count, comma-separated classes the slides cycle through.")]
GuidanceOption = Annotated[float | None, typer.Option(
    help="Classifier-free guidance w: D_∅ + w·(D_c − D_∅) at every stage (1: the class model alone, "
         "one evaluation; other w: two per call, in one batched pass) [default: 1].", min=0)]

# the schedule options (run/presets.py), the same for sample, upscale and plan
SolverOption = Annotated[str | None, typer.Option(help="heun, euler or dpmpp2m (DPM-Solver++(2M), one evaluation per step) [default: heun].")]
PresetOption = Annotated[str | None, typer.Option(help="paper (Heun, N = 40, r = 28, every stage from σ_max) or fast (docs/performance.md, \"Schedules\"); fills the schedule options not given.")]
GuidedSigmaOption = Annotated[float | None, typer.Option(help="σ_r: both evaluations of step i are projected iff t_i ≥ σ_r (0: every step); excludes --guided-steps.", min=0)]
StartSigmaOption = Annotated[float | None, typer.Option(help="Guided stages start at A†y + S·ε and run a schedule from S down to σ_min (stage 0 always from σ_max).")]
StageStepsOption = Annotated[str | None, typer.Option(help="Steps per guided stage, counted from the last stage back (e.g. 40,32,24: last 24, one before 32, earlier 40); stage 0 takes --steps.")]
