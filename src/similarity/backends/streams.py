"""Run one batch as several parts at once, one per inference stream.

With two threads sharing every operator, each operator ends in a barrier: when a decode thread
takes one core, the other thread waits at the barrier too. Single-threaded streams do not wait for
each other. On the bench's 2 vCPU host, in paired end-to-end runs of six rounds, two one-thread
streams against one two-thread stream gave ONNX Runtime fp32 +10-12% and int8 +14-16%, OpenVINO
bf16 +2-10% and int8 +2%. In one paired run of ONNX Runtime's image tower alone, with no decoding
beside it, it gained ~20% (fp32) and ~10% (int8): fewer barriers, fewer idle waits. The cost: a
batch of one image runs on one core (ONNX fp32: ~110 ms instead of ~70 ms).

ONNX Runtime runs the parts from Python threads (``BatchStreams``); OpenVINO runs them as
asynchronous infer requests on its own stream threads (see ``backends.openvino``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ..hardware import cpu_count


def plan(threads: int | None, streams: int | None) -> tuple[int, int]:
    """(streams, threads per stream). Default: one single-threaded stream per core."""
    total = threads or cpu_count()
    if total < 1 or (streams is not None and streams < 1):
        raise ValueError(f"threads and streams must be at least 1 (got threads={threads}, streams={streams})")
    count = min(streams or total, total)
    return count, max(1, total // count)


def row_parts(rows: int, count: int) -> list[slice]:
    """Up to ``count`` contiguous, near-equal slices covering ``rows`` rows in order."""
    parts = max(1, min(count, rows))
    bounds = np.linspace(0, rows, parts + 1).round().astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


class BatchStreams:
    """Splits the rows of a batch into up to ``count`` contiguous parts, runs ``fn`` on each part
    in its own thread (the caller's thread takes the first) and joins the outputs in row order.
    ``fn`` must release the GIL while it computes, as ONNX Runtime's ``run`` does."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self._pool = ThreadPoolExecutor(self.count - 1, thread_name_prefix="stream") if self.count > 1 else None

    def run(self, fn: Callable[..., np.ndarray], *arrays: np.ndarray) -> np.ndarray:
        parts = row_parts(len(arrays[0]), self.count)
        if len(parts) == 1 or self._pool is None:
            return fn(*arrays)
        slices = [tuple(a[p] for a in arrays) for p in parts]
        futures = [self._pool.submit(fn, *s) for s in slices[1:]]
        try:
            first = fn(*slices[0])
        finally:
            wait(futures)  # never leave a part running on buffers the caller may reuse
        return np.concatenate([first, *(f.result() for f in futures)])
