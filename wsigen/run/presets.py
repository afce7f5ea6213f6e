"""Sampling schedules by name (``--preset paper|fast``) and the resolution of the schedule options.

A preset fills the schedule options the user did not give; what the store's configuration and key
hold are the resolved values (the preset's name is provenance only). ``resolve`` turns a request's
schedule options and a model's recorded defaults into the values ``Settings`` runs:

- ``--guided-sigma σ_r`` projects step i iff t_i ≥ σ_r; ``--guided-steps r`` (the index rule)
  keeps working for the plain schedule. When the schedule changes (a part-way start or per-stage
  step counts), r — the user's on the plain schedule, or the model's recorded one on the model's
  own schedule — is converted once to its σ_r (``schedules.sigma_for_index``), so the relaxation
  stays at the same noise level.
- Without any of the new options the values are exactly today's (the model's N and r scaled).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..method import schedules

PRESET_NAMES = ("paper", "fast")

#: The paper's settings (Harb et al.: Heun, N = 40, r = 28, every stage from σ_max), whatever the
#: model records; and the fast schedule chosen by benchmarks/schedules.py (docs/performance.md,
#: "Schedules"), as rules: DPM-Solver++(2M) (one evaluation per step); stage 0 the model's N from
#: σ_max; every guided stage starts at A†y + 2·ε, the last one runs 12 steps and every earlier
#: guided stage 10; projected while t_i ≥ 0.22 (measured: the model's σ_r ≈ 0.30 left the guide
#: PSNR 3 dB below paper's on this short schedule, 0.15 put it 3 dB above, 0.22 within 0.2 dB).
PRESETS: dict[str, dict] = {
    "paper": {"steps": 40, "guided_steps": 28, "solver": "heun"},
    "fast": {"solver": "dpmpp2m", "start_sigma": 2.0, "stage_steps": (10, 12), "guided_sigma": 0.22},
}
_EXCLUSIVE = {"guided_steps": "guided_sigma", "guided_sigma": "guided_steps"}  # one relaxation rule


@dataclass(frozen=True)
class Resolved:
    """The schedule a run uses (every field as stored in the slide's configuration)."""

    steps: int
    guided_steps: int
    solver: str
    guided_sigma: float | None
    start_sigma: float | None
    stage_steps: tuple[int, ...] | None
    preset: str | None

    def record(self) -> dict:
        """The schedule options that are set, as the store's configuration records them."""
        return schedule_record(self, SCHEDULE_FIELDS)


#: The schedule options a configuration records only when set (older stores lack them)
SCHEDULE_FIELDS = ("guided_sigma", "start_sigma", "stage_steps", "preset")


def schedule_record(obj, names) -> dict:
    """``names`` of ``obj`` that are not None, ``stage_steps`` as a list (JSON)."""
    out = {}
    for k in names:
        v = getattr(obj, k)
        if v is not None:
            out[k] = list(v) if k == "stage_steps" else v
    return out


def check_preset(name: str | None) -> None:
    if name is not None and name not in PRESET_NAMES:
        raise UsageError(f"--preset must be paper or fast (got {name})")


def resolve(req, mc: dict) -> Resolved:
    """``req``: a validated ``config.Request`` (the options' own checks are its); ``mc``: model config."""
    given = {k: getattr(req, k) for k in ("steps", "guided_steps", "solver", "guided_sigma", "start_sigma",
                                          "stage_steps")}
    if req.preset is not None:
        for k, v in PRESETS[req.preset].items():
            if given[k] is None and (k not in _EXCLUSIVE or given[_EXCLUSIVE[k]] is None):
                given[k] = v
    steps = given["steps"] if given["steps"] is not None else mc["steps"]
    solver = given["solver"] or "heun"
    start, stage_steps = given["start_sigma"], given["stage_steps"]
    if stage_steps is not None:
        stage_steps = schedules.parse_stage_steps(stage_steps)
    plain = schedules.stage_schedule(steps, mc["sigma_min"], mc["sigma_max"], mc["rho"])
    sigma = given["guided_sigma"]
    r = given["guided_steps"]
    if sigma is None and (start is not None or stage_steps is not None):
        if r is not None:  # the user's r on the plain schedule
            sigma = schedules.sigma_for_index(plain, r)
        else:  # the model's recorded r on the model's own schedule
            own = schedules.stage_schedule(mc["steps"], mc["sigma_min"], mc["sigma_max"], mc["rho"])
            sigma = schedules.sigma_for_index(own, mc["guided_steps"])
    if r is None:
        if sigma is not None:  # what σ_r means on the plain schedule (for the log and the report)
            r = sum(1 for t in plain[:-1] if t >= sigma)
        else:
            r = min(steps, round(steps * mc["guided_steps"] / mc["steps"]))
    if not 0 <= r <= steps:
        raise UsageError(f"--guided-steps must lie in [0, steps={steps}] (got {r})")
    return Resolved(steps=steps, guided_steps=r, solver=solver,
                    guided_sigma=None if sigma is None else float(sigma),
                    start_sigma=None if start is None else float(start), stage_steps=stage_steps,
                    preset=req.preset)
