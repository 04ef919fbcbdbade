"""Batch streams: a batch cut into parts that run at once and come back in row order."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from similarity.backends.streams import BatchStreams, plan, row_parts


@pytest.mark.parametrize(("rows", "count", "sizes"), [(32, 2, [16, 16]), (7, 3, [2, 3, 2]), (1, 4, [1]), (5, 1, [5])])
def test_row_parts_cover_every_row_in_order(rows, count, sizes) -> None:
    parts = row_parts(rows, count)
    assert [p.stop - p.start for p in parts] == sizes
    assert np.concatenate([np.arange(rows)[p] for p in parts]).tolist() == list(range(rows))


@pytest.mark.parametrize(
    ("threads", "streams", "expected"),
    [(None, None, (2, 1)), (4, None, (4, 1)), (4, 2, (2, 2)), (4, 3, (3, 1)), (2, 8, (2, 1)), (1, None, (1, 1))],
)
def test_plan_splits_threads_into_streams(monkeypatch, threads, streams, expected) -> None:
    monkeypatch.setattr("similarity.backends.streams.cpu_count", lambda: 2)
    assert plan(threads, streams) == expected


def test_parts_run_at_once_and_join_in_order() -> None:
    barrier = threading.Barrier(3, timeout=10)  # breaks unless all three parts are running together
    callers = set()

    def fn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        callers.add(threading.get_ident())
        barrier.wait()
        return a * 10 + b

    a, b = np.arange(10), np.arange(10)[::-1].copy()
    out = BatchStreams(3).run(fn, a, b)
    assert out.tolist() == (a * 10 + b).tolist()
    assert len(callers) == 3 and threading.get_ident() in callers  # the caller takes a part itself


def test_a_failing_part_raises_after_every_part_finished() -> None:
    finished = []

    def fn(a: np.ndarray) -> np.ndarray:
        if a[0] == 0:
            raise RuntimeError("boom")
        threading.Event().wait(0.2)
        finished.append(int(a[0]))
        return a

    with pytest.raises(RuntimeError, match="boom"):
        BatchStreams(2).run(fn, np.arange(4))
    assert finished == [2]
