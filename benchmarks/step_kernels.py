"""The kernel choices inside a Heun step, on one row segment (32 patches of 64², one thread):
k×k pooling by strided sums (``guidance.avgpool``) against ``F.avg_pool2d``, and the eager in-place
projection + Euler point against the same arithmetic fused by ``torch.compile`` (inductor).
Prints the times and their ratios; best of 5 rounds each."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import save

from wsigen.method.guidance import avgpool, project_


def best_us(fn, reps: int = 40, rounds: int = 5) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patches", type=int, default=32)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="skip the inductor comparison")
    a = ap.parse_args()
    torch.set_num_threads(1)
    n, m, k = a.patches, a.patch, 2
    x, u = torch.randn(n, 3, m, m), torch.randn(n, 3, m, m)
    y = torch.randn(n, 3, m // k, m // k)
    w = 0.7  # t_next / t_cur

    def eager():
        return torch.lerp(project_(u.clone(), y, k), x, w)

    def fused(u, x, y):
        p = u.view(n, 3, m // k, k, m // k, k).mean((3, 5))
        ubar = (u.view(n, 3, m // k, k, m // k, k) + (y - p)[:, :, :, None, :, None]).view(n, 3, m, m)
        return torch.lerp(ubar, x, w)

    res = {"patches": a.patches, "patch": a.patch,
           "avgpool_strided_us": best_us(lambda: avgpool(u, k)),
           "avg_pool2d_us": best_us(lambda: F.avg_pool2d(u, k)),
           "project_lerp_eager_us": best_us(eager)}
    res["avg_pool2d_over_strided"] = res["avg_pool2d_us"] / res["avgpool_strided_us"]
    print(f"pooling: strided sums {res['avgpool_strided_us']:.0f} µs, F.avg_pool2d "
          f"{res['avg_pool2d_us']:.0f} µs ({res['avg_pool2d_over_strided']:.1f}×)")
    if not a.no_compile:
        compiled = torch.compile(fused, dynamic=False)
        err = float((compiled(u, x, y) - eager()).abs().max())  # also compiles
        res["project_lerp_compiled_us"] = best_us(lambda: compiled(u, x, y))
        res["compiled_over_eager"] = res["project_lerp_compiled_us"] / res["project_lerp_eager_us"]
        res["max_abs_difference"] = err
        print(f"projection + Euler point: eager in place {res['project_lerp_eager_us']:.0f} µs, "
              f"torch.compile {res['project_lerp_compiled_us']:.0f} µs "
              f"({res['compiled_over_eager']:.2f}×; max |Δ| {err:.1e})")
    save("step_kernels", res)


if __name__ == "__main__":
    main()
