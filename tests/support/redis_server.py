"""A real redis-server on 127.0.0.1 for the cache tests: started on a free port with no
persistence, as a child process whose pid the test holds (kill, pause and resume it on purpose).
Tests skip with a clear reason when the binary is absent (.ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BINARY = shutil.which("redis-server")
SKIP_REASON = "redis-server is not installed (apt-get install -y redis-server; .ci/run does)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, maxmemory: str = "64mb", policy: str = "allkeys-lru") -> None:
        if BINARY is None:
            raise RuntimeError(SKIP_REASON)
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.maxmemory = maxmemory
        self.policy = policy
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> RedisServer:
        for _attempt in range(5):  # a free port can be taken between the probe and the bind
            self.port = port or free_port()
            args = [
                str(BINARY),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log"),
                "--protected-mode", "yes",
                "--maxmemory", self.maxmemory,
                "--maxmemory-policy", self.policy,
            ]  # fmt: skip
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            self.kill()
            if port is not None:
                break
        raise RuntimeError(f"redis-server did not start; log: {self.log()[-500:]}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-conversation."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server accepts nothing and answers nothing (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.resume()
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> Any:
        """A plain client for the tests' own checks."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)


def running(**kwargs: str) -> Iterator[RedisServer]:
    """For fixtures: ``yield from running()`` gives a started server and stops it afterwards."""
    import pytest

    if BINARY is None:
        pytest.skip(SKIP_REASON)
    srv = RedisServer(**kwargs).start()
    try:
        yield srv
    finally:
        srv.stop()
