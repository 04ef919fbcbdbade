"""The per-fetch deadline: one watchdog thread shuts a fetch's sockets down when its time is up."""

from __future__ import annotations

import socket
import time

from similarity.fetch.deadline import Deadline, Watchdog


def test_deadlines_expire_in_order_of_their_end_not_of_their_start() -> None:
    """One watchdog thread serves every fetch: a short deadline set after a long one still
    shuts its socket down on time."""
    long_a, long_b = socket.socketpair()
    short_a, short_b = socket.socketpair()
    start = time.monotonic()
    slow, quick = Deadline(30), Deadline(0.3)
    slow.watch(long_a)
    quick.watch(short_a)
    short_a.settimeout(5)
    assert short_a.recv(1) == b""  # shut down under us: EOF, long before the 5 s timeout
    assert 0.29 < time.monotonic() - start < 2.0
    assert quick.expired and not slow.expired
    long_b.sendall(b"x")
    assert long_a.recv(1) == b"x"  # the other fetch's socket is untouched
    slow.cancel()
    for s in (long_a, long_b, short_a, short_b):
        s.close()


def test_a_finished_fetch_leaves_its_socket_alone_after_its_deadline() -> None:
    """A kept-alive socket outlives the fetch that opened it; that fetch's deadline passing later
    must not shut it down under the next fetch."""
    a, b = socket.socketpair()
    done = Deadline(0.2)
    done.watch(a)
    done.cancel()
    time.sleep(0.5)
    b.sendall(b"y")
    assert a.recv(1) == b"y"
    assert not done.expired
    a.close()
    b.close()


def test_finished_fetches_do_not_pile_up_in_the_watchdog() -> None:
    watchdog = Watchdog()
    live = [Deadline(60, watchdog) for _ in range(10)]
    for _ in range(3 * watchdog.MIN_PRUNE):
        Deadline(60, watchdog).cancel()
    assert len(watchdog.heap) <= watchdog.MIN_PRUNE + 10
    assert all(any(entry[2] is d for entry in watchdog.heap) for d in live)  # the live ones stay
    for d in live:
        d.cancel()
