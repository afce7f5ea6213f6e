"""Shared helpers for the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    d = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
         "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2))
    print(f"→ {path}")
    return path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_denoiser(inner):
    """``inner`` with each forward pass timed (synchronised on CUDA): ``.seconds``, ``.calls``."""
    import torch

    class Timed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.seconds, self.calls = inner, 0.0, 0
            self.pixelwise = getattr(inner, "pixelwise", False)

        def forward(self, *args):
            t = time.perf_counter()
            out = self.inner(*args)
            if out.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out

    return Timed()
