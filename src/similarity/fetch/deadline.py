"""A total deadline per fetch, enforced by shutting the fetch's sockets down when it passes, so a
server that drips one byte a second cannot hold a row (per-read timeouts alone would never fire).

One daemon thread expires every fetch's deadline, earliest first: a timer thread per fetch cost
~0.2 ms of CPU to start and stop, more with the GIL contended.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar


def shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Deadline:
    """Sockets opened or used by one fetch; shut down when its deadline passes."""

    def __init__(self, seconds: float, watchdog: Watchdog | None = None) -> None:
        self.end = time.monotonic() + max(seconds, 0.0)
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.done = False
        (watchdog or WATCHDOG).add(self)

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self.expired:
                shutdown(sock)
            elif sock not in self._socks:
                self._socks.append(sock)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for s in self._socks:
                shutdown(s)

    def cancel(self) -> None:
        with self._lock:
            self.done = True
            self._socks.clear()  # the heap may hold this object until its end; not the sockets


class Watchdog:
    MIN_PRUNE = 4096

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()  # ties never compare deadlines
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._prune_at = self.MIN_PRUNE

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            if len(self.heap) >= self._prune_at:
                # Finished fetches stay in the heap until their end: ~9,000 entries at the GPU
                # task's 300 fetches a second with 30 s deadlines. Dropping them whenever the heap
                # has doubled keeps it within twice the fetches in flight, at O(1) amortised cost.
                self.heap = [entry for entry in self.heap if not entry[2].done]
                heapq.heapify(self.heap)
                self._prune_at = max(self.MIN_PRUNE, 2 * len(self.heap))
            heapq.heappush(self.heap, (deadline.end, next(self._seq), deadline))
            if self._thread is None or not self._thread.is_alive():  # first use, or a forked child
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            elif self.heap[0][2] is deadline:
                self._cond.notify()  # earlier than what the thread sleeps towards

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.heap or self.heap[0][0] > time.monotonic():
                    self._cond.wait(self.heap[0][0] - time.monotonic() if self.heap else None)
                _, _, deadline = heapq.heappop(self.heap)
            deadline.expire()  # outside the lock: shutting sockets down may block briefly


WATCHDOG = Watchdog()
if hasattr(os, "register_at_fork"):  # the parent's thread and lock do not survive a fork
    os.register_at_fork(after_in_child=WATCHDOG._reset)

_current = threading.local()


def set_current(deadline: Deadline | None) -> None:
    """The deadline of the fetch running on this thread (the connection code has no other way in)."""
    _current.deadline = deadline


def remaining() -> float | None:
    """Seconds left to the current thread's fetch deadline; None outside a fetch."""
    dl: Deadline | None = getattr(_current, "deadline", None)
    return dl.remaining() if dl is not None else None


def watch(sock: socket.socket | None) -> None:
    """Put ``sock`` under the current thread's fetch deadline, if there is one."""
    dl: Deadline | None = getattr(_current, "deadline", None)
    if dl is not None:
        dl.watch(sock)


T = TypeVar("T")


class DeadlinePassed(Exception):
    """``run_with_deadline``'s call did not return in time (it goes on in its thread, unobserved)."""


def run_with_deadline(fn: Callable[[], T], seconds: float, name: str = "deadline-call") -> T:
    """``fn()`` on a daemon thread, given up on after ``seconds``: for blocking calls no socket
    can interrupt (a read of a hung network file system). A call that overruns keeps its thread
    until it returns; only its result is dropped."""
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()

    def target() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    if not done.wait(max(seconds, 0.0)):
        raise DeadlinePassed(f"no answer within {seconds:g}s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
