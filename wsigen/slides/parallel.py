"""Threads for streaming I/O: an in-order map with bounded look-ahead, and how many threads to use.

The store's pyramid, the exporters and the sampler's writer all stream chunks or tiles through
these, so memory in flight stays a few items per thread whatever the image size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor


def bounded_map(fn: Callable, items: Iterable, workers: int, ahead: int | None = None) -> Iterator:
    """``map(fn, items)`` in order on ``workers`` threads with at most ``ahead`` results pending.

    Unlike ``Executor.map`` it consumes ``items`` lazily, so memory stays bounded.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    ahead = ahead or 2 * workers
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(workers) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
