"""Run every benchmark in turn (``make bench``); each prints its ratios and writes JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["pipeline.py", "scaling.py", "overhead.py", "throughput.py", "state_dtype.py", "export.py", "workers.py",
         "io_overlap.py", "step_kernels.py", "conditional.py"]


def main() -> int:
    failed = []
    for name in ORDER:
        script = HERE / name
        if not script.exists():
            continue
        print(f"\n=== {name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=HERE).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
