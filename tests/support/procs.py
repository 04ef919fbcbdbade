"""Which process holds a loopback TCP connection, read from /proc (Linux; nothing is contacted)."""

from __future__ import annotations

import os
from pathlib import Path


def _inodes(port: int) -> set[str]:
    """Socket inodes of TCP connections whose local port is ``port`` (IPv4 and IPv6 tables)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


def pid_with_local_port(port: int, candidates: list[int]) -> int | None:
    """The pid among ``candidates`` that holds the TCP socket with local port ``port``."""
    inodes = {f"socket:[{i}]" for i in _inodes(port)}
    for pid in candidates:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd_dir / fd) in inodes:
                    return pid
            except OSError:  # closed since the listing
                continue
    return None
