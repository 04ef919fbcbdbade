"""Local image paths (the CLI's): only regular files are read, the cap holds on what is read, and a
read that never returns costs its row the deadline, not the run.

Every kind of non-regular file is tried directly and through a symlink, since a CSV can name either.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from similarity.errors import FetchTimeout, NotFound, RowError, TooLarge
from similarity.fetch import Fetcher, FetchSettings, sources
from support.imageserver import png_bytes

PNG = png_bytes(Image.new("RGB", (20, 10), (200, 10, 10)))
SRC = Path(__file__).resolve().parents[2] / "src"


def local(**changes: object) -> Fetcher:
    base = {"allow_local_paths": True, "deadline": 3.0, "read_timeout": 3.0, "max_bytes": 1024 * 1024}
    return Fetcher(FetchSettings(**{**base, **changes}))  # type: ignore[arg-type]


def fetch_within(fetcher: Fetcher, url: str, seconds: float = 10.0) -> bytes | RowError:
    """The fetch's bytes or row error; fails (instead of hanging the suite) when it blocks."""
    out: list[bytes | RowError] = []

    def run() -> None:
        try:
            out.append(fetcher.fetch(url))
        except RowError as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"fetching {url} did not return within {seconds}s"
    return out[0]


def _fifo(tmp: Path) -> Path:
    p = tmp / "fifo"
    os.mkfifo(p)  # nobody ever writes: opening it for reading would wait forever
    return p


def _socket(tmp: Path) -> Path:
    p = tmp / "sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(p))
    s.listen(1)
    _socket.keep = s  # type: ignore[attr-defined]  # listening for the test's life
    return p


def _pipe_reader() -> int:
    r, w = os.pipe()
    _pipe_reader.keep = (r, w)  # type: ignore[attr-defined]  # open for the test's life, never written
    return r


def _sys_file(_tmp: Path) -> Path:
    for candidate in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/kexec_loaded", "/sys/power/state"):
        if os.path.isfile(candidate) and os.access(candidate, os.R_OK):
            return Path(candidate)
    pytest.skip("no readable /sys attribute file here")


def _existing(path: str) -> Callable[[Path], Path]:
    def make(_tmp: Path) -> Path:
        if not os.path.exists(path):
            pytest.skip(f"{path} does not exist here")
        return Path(path)

    return make


NON_REGULAR: dict[str, Callable[[Path], Path]] = {
    "char device /dev/zero": lambda _t: Path("/dev/zero"),
    "char device /dev/null": lambda _t: Path("/dev/null"),
    "char device /dev/urandom": lambda _t: Path("/dev/urandom"),
    "fifo": _fifo,
    "directory": lambda t: t,
    "unix socket": _socket,
    "proc file /proc/self/status": lambda _t: Path("/proc/self/status"),
    "proc file /proc/self/environ": lambda _t: Path("/proc/self/environ"),
    "proc file /proc/version": lambda _t: Path("/proc/version"),
    "proc file /proc/kcore (reports 128 TB)": _existing("/proc/kcore"),
    "proc file /proc/self/mem": lambda _t: Path("/proc/self/mem"),
    "proc fd link to a pipe /proc/self/fd/N": lambda _t: Path(f"/proc/self/fd/{_pipe_reader()}"),
    "cgroup file": _existing("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "sys file": _sys_file,
}


@pytest.mark.parametrize("via_symlink", [False, True], ids=["direct", "symlink"])
@pytest.mark.parametrize("kind", sorted(NON_REGULAR))
def test_non_regular_files_are_refused(tmp_path, kind, via_symlink) -> None:
    target = NON_REGULAR[kind](tmp_path)
    path = target
    if via_symlink:
        path = tmp_path / "link.png"
        path.symlink_to(target)
    for url in (str(path), path.as_uri()):
        got = fetch_within(local(), url)
        assert isinstance(got, RowError) and got.code == "not_a_file", (kind, url, got)


def test_dev_stdin_of_a_pipe_does_not_hang() -> None:
    """The reproducer: ``/dev/stdin`` with a writer that never writes stopped the run for good."""
    code = (
        f"import sys;sys.path.insert(0,{str(SRC)!r});from similarity.fetch import Fetcher,FetchSettings;"
        "from similarity.errors import RowError\n"
        "try:\n Fetcher(FetchSettings(allow_local_paths=True,deadline=2)).fetch('/dev/stdin');print('read')\n"
        "except RowError as e:\n print(e.code)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=30)  # stdin stays open and empty until this returns
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("fetching /dev/stdin hung")
    assert out.strip() == "not_a_file"


def test_cap_is_checked_on_the_bytes_read(tmp_path, monkeypatch) -> None:
    # /proc files report 0 bytes whatever they hold: the size check alone let them through
    got = fetch_within(local(max_bytes=64), "/proc/self/maps")
    assert isinstance(got, RowError) and got.code in ("not_a_file", "too_large")
    big = tmp_path / "big.png"
    big.write_bytes(PNG + b"\0" * 200)
    got = fetch_within(local(max_bytes=len(PNG)), str(big))
    assert isinstance(got, TooLarge)
    # a file that passes the size check and grows past the cap while it is read
    p = tmp_path / "grows.png"
    p.write_bytes(PNG)
    inode = p.stat().st_ino
    real_read = os.read

    def read_then_grow(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if data and os.fstat(fd).st_ino == inode and p.stat().st_size < 10 * len(PNG):
            with open(p, "ab") as fh:
                fh.write(b"\0" * len(PNG))
        return data

    monkeypatch.setattr(sources.os, "read", read_then_grow)
    got = fetch_within(local(max_bytes=3 * len(PNG)), str(p))
    assert isinstance(got, TooLarge) and "bytes read" in got.detail


def test_file_that_changes_size_while_read_is_refused(tmp_path, monkeypatch) -> None:
    p = tmp_path / "growing.png"
    p.write_bytes(PNG)
    real_read = os.read

    inode = p.stat().st_ino
    grown: list[bool] = []

    def read_then_grow(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if data and not grown and os.fstat(fd).st_ino == inode:
            grown.append(True)
            with open(p, "ab") as fh:  # another process appending while we read
                fh.write(b"more")
        return data

    monkeypatch.setattr(sources.os, "read", read_then_grow)  # undone before pytest reads anything
    got = fetch_within(local(), str(p))
    assert isinstance(got, RowError) and got.code == "not_a_file" and "were read" in got.detail


def test_regular_files_and_symlinks_to_them_still_read(tmp_path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(PNG)
    link = tmp_path / "link.png"
    link.symlink_to(p)
    f = local()
    assert f.fetch(str(p)) == PNG and f.fetch(str(link)) == PNG and f.fetch(link.as_uri()) == PNG
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert f.fetch(str(empty)) == b""  # the decoder says not_an_image (empty body)
    got = fetch_within(f, str(tmp_path / "missing.png"))
    assert isinstance(got, NotFound)
    unreadable = tmp_path / "secret.png"
    unreadable.write_bytes(PNG)
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        assert isinstance(fetch_within(f, str(unreadable)), NotFound)


def test_a_read_that_never_returns_costs_the_deadline() -> None:
    """A blocking read nothing can interrupt (a pipe here; a hung NFS or FUSE mount in real life)."""
    from similarity.fetch.deadline import DeadlinePassed, run_with_deadline

    r, w = os.pipe()
    try:
        start = time.monotonic()
        with pytest.raises(DeadlinePassed):
            run_with_deadline(lambda: os.read(r, 10), 0.5)
        assert time.monotonic() - start < 3
    finally:
        os.write(w, b"x")  # let the abandoned thread finish
        os.close(w)
    assert run_with_deadline(lambda: 42, 1) == 42
    with pytest.raises(KeyError):
        run_with_deadline(lambda: {}["x"], 1)  # the call's own error reaches the caller


def test_local_fetch_runs_under_the_deadline(tmp_path, monkeypatch) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(PNG)
    r, w = os.pipe()

    def hung_read(path: Path, cap: int) -> bytes:
        return os.read(r, cap)  # blocks like a read from a mount whose server went away

    monkeypatch.setattr(sources, "read_regular_file", hung_read)
    start = time.monotonic()
    got = fetch_within(local(deadline=0.5), str(p))
    assert isinstance(got, FetchTimeout) and time.monotonic() - start < 3
    os.write(w, b"x")
    os.close(w)


def test_pseudo_file_systems_are_told_by_their_mount(tmp_path) -> None:
    """Files on proc, sysfs, tracefs... are interfaces whatever stat says (S_ISREG, any size):
    they are found by the device of the mount they live on."""
    from similarity.fetch.sources import pseudo_filesystem

    dev = os.stat(tmp_path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    fake = tmp_path / "mountinfo"
    fake.write_text(f"36 25 {major}:{minor} / /mnt rw,relatime shared:1 - tracefs tracefs rw\n")
    assert pseudo_filesystem(dev, str(fake)) == "tracefs"
    fake.write_text(f"36 25 {major}:{minor} / /mnt rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
    assert pseudo_filesystem(dev, str(fake)) is None
    assert pseudo_filesystem(dev, str(tmp_path / "absent")) is None  # not Linux: the size check remains
    if os.path.exists("/proc/self/mountinfo"):
        assert pseudo_filesystem(os.stat("/proc/self/status").st_dev) == "proc"


@pytest.mark.parametrize("name", ["a\0b.png", "images/red\0circle.png", "ok.png\0"])
def test_a_name_holding_nul_is_not_found(tmp_path, name) -> None:
    (tmp_path / "ok.png").write_bytes(PNG)
    f = Fetcher(FetchSettings(allow_local_paths=True, deadline=3.0), base_dir=tmp_path)
    for url in (name, str(tmp_path / name), "file://" + str(tmp_path / name).replace("\0", "%00")):
        got = fetch_within(f, url)
        assert isinstance(got, NotFound), (url, got)
        assert "\0" not in got.detail and "NUL" in got.detail  # the error column gets no raw NUL
