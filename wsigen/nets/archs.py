"""Named UNet architectures (``--arch small|paper|FILE.json``) and single-field overrides.

``small`` is the training default (a CPU-sized net); ``paper`` is the network of Harb et al.
fixed as: M = 512, width 64, channel multipliers (1, 2, 2, 4, 4, 4) (512² down to 16²), two
residual blocks per level, self-attention at 32² and 16² (levels 4 and 5), dropout 0.1. A JSON
file gives any :class:`UNetConfig` (plus an optional ``patch``); unknown fields are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError
from .unet import UNetConfig


@dataclass(frozen=True)
class Arch:
    """A network and the patch size M it is meant for."""

    name: str
    net: UNetConfig
    patch: int


NAMED = {
    "small": Arch("small", UNetConfig(width=32, mults=(1, 2, 2), blocks=1), 64),
    "paper": Arch(
        "paper",
        UNetConfig(width=64, mults=(1, 2, 2, 4, 4, 4), blocks=2, attn_levels=(4, 5), dropout=0.1),
        512,
    ),
}

#: What ``paper`` costs, pinned by tests/test_archs.py: parameters, and GFLOP (multiply-adds ×2,
#: torch's FlopCounterMode) of one forward evaluation of a 512² patch, batch 1.
PAPER_PARAMETERS = 39_949_251
PAPER_GFLOP_512 = 830.14


def resolve(text: str) -> Arch:
    """``small``, ``paper`` or a JSON file of UNetConfig fields (UsageError on anything else)."""
    if text in NAMED:
        return NAMED[text]
    p = Path(text)
    if not p.suffix.lower() == ".json" and not p.exists():
        raise UsageError(f"--arch must be small, paper or a JSON file (got {text!r})")
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"--arch file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--arch {p}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict):
        raise UsageError(f"--arch {p}: expected a JSON object of UNet fields")
    fields = {"width", "mults", "blocks", "attn_levels", "emb_freqs", "dropout", "patch"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise UsageError(
            f"--arch {p}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    patch = d.pop("patch", NAMED["small"].patch)
    try:
        net = UNetConfig.from_dict({**NAMED["small"].net.to_dict(), **d, "extra": {}})
        _check(net)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--arch {p}: {e}") from None
    if not isinstance(patch, int) or patch < 8:
        raise UsageError(f"--arch {p}: patch must be an integer ≥ 8 (got {patch!r})")
    return Arch(str(p), net, patch)


def _check(net: UNetConfig) -> None:
    if not isinstance(net.emb_freqs, int) or net.emb_freqs < 1:
        raise ValueError(f"emb_freqs must be a positive integer (got {net.emb_freqs!r})")
    if not 0 <= net.dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1) (got {net.dropout!r})")


def override(net: UNetConfig, **fields) -> UNetConfig:
    """``net`` with the given (not None) fields replaced and validated (UsageError)."""
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return net
    try:
        out = UNetConfig.from_dict({**replace(net, **given).to_dict(), "extra": {}})
        _check(out)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad network: {e}") from None
    return out


def parse_levels(text: str | None, what: str = "--attn-levels") -> tuple[int, ...] | None:
    """'4,5' → (4, 5); '' or 'none' → (); None → None (not given)."""
    if text is None:
        return None
    t = text.replace(" ", "")
    if t in ("", "none"):
        return ()
    try:
        vals = tuple(int(v) for v in t.split(","))
    except ValueError:
        raise UsageError(f"{what} must be comma-separated level indices such as 4,5 (got {text!r})") from None
    if any(v < 0 for v in vals):
        raise UsageError(f"{what} must be level indices ≥ 0 (got {text!r})")
    return vals


def parse_classes(text: str | None, what: str = "--classes", at_least: int = 2) -> list[str] | None:
    """'tumour,normal' → ['tumour', 'normal'] (distinct, non-empty); None → None (not given)."""
    if text is None:
        return None
    names = [v.strip() for v in text.split(",")]
    if any(not n for n in names):
        raise UsageError(f"{what} takes comma-separated class names (got {text!r})")
    if len(set(names)) != len(names):
        raise UsageError(f"{what} names a class twice (got {text!r})")
    if len(names) < at_least:
        raise UsageError(f"{what} needs at least {at_least} classes (got {text!r}); "
                         "one class is a class-free model")
    return names
