"""Crash-safe, ordered commits of a run's output, and resuming from them (``--resume``).

A run writing to a file keeps its output in a partial directory until it completes:

- ``run.json``: what the rows depend on (the input's size and SHA-256, or its S3 ETag and version;
  the formats, columns, encoding and options; the model, backend and precision). A resume checks
  it first and refuses (``ResumeMismatch``) when anything differs.
- ``rows``: the output's rows in input order, in the output format (for Parquet, Arrow IPC
  messages; gzip outputs are compressed only at the end).
- ``commits.jsonl``: one line per commit: rows and bytes of ``rows`` that are final, and the
  counts so far. A commit is written after ``rows`` is flushed and fsync'd, and is itself fsync'd,
  so whatever a crash (even SIGKILL) leaves, the last complete line names a prefix that is on disk.

A resume cuts ``rows`` back to the last commit, skips that many input rows (they are not fetched
again) and appends the rest, so its output is byte for byte what an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import OutputUnwritable, ResumeMismatch
from ..types import ScoreStats

PARTIAL_SUFFIX = ".partial"
_VERSION = 1


@dataclass(frozen=True)
class Commit:
    rows: int = 0
    bytes: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def stats_of(data: dict[str, Any]) -> ScoreStats:
    known = {k: v for k, v in data.items() if k in ScoreStats.__dataclass_fields__}
    return ScoreStats(**known)


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the new names themselves durable
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Partial:
    """The partial directory of one output (see the module's docstring)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.data_path = directory / "rows"
        self.run_path = directory / "run.json"
        self.log_path = directory / "commits.jsonl"
        self._data: BinaryIO | None = None
        self._log: BinaryIO | None = None

    def exists(self) -> bool:
        return self.run_path.is_file()

    def resumable(self) -> bool:
        """Whether there is something to continue: ``run.json``, a commit naming rows or bytes, and
        ``rows`` holding at least those bytes. Less (a run killed before its first commit, or its
        ``rows`` gone) is started over, which loses nothing committed."""
        if not self.exists():
            return False
        last = self.last_commit()
        try:
            size = self.data_path.stat().st_size
        except OSError:
            return False
        return (last.rows > 0 or last.bytes > 0) and size >= last.bytes

    # ------------------------------------------------------------------ reading
    def identity(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.run_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data

    def last_commit(self) -> Commit:
        """The last complete commit line (a torn last line, cut by a crash, does not count)."""
        last = Commit()
        with contextlib.suppress(FileNotFoundError), self.log_path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(raw)
                    last = Commit(int(entry["rows"]), int(entry["bytes"]), dict(entry.get("stats", {})))
                except (ValueError, KeyError, TypeError):
                    break
        return last

    def check(self, identity: dict[str, Any]) -> None:
        """``ResumeMismatch`` naming what differs between this partial output and ``identity``."""
        stored = self.identity()
        identity = json.loads(json.dumps({"version": _VERSION, **identity}))  # as stored: tuples are lists
        diffs = [k for k in sorted(set(stored) | set(identity)) if stored.get(k) != identity.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: was {stored.get(k)!r}, now {identity.get(k)!r}" for k in diffs[:4])
            raise ResumeMismatch(
                f"cannot resume {self.dir}: {shown}. Rerun with the same input and options, "
                "or with --restart to discard it"
            )

    # ------------------------------------------------------------------ writing
    def start(self, identity: dict[str, Any]) -> BinaryIO:
        """A fresh partial output (any earlier one removed); returns ``rows`` open for writing."""
        self.discard()
        try:
            self.dir.mkdir(parents=True)
            tmp = self.run_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": _VERSION, **identity}, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.run_path)
            self._log = self.log_path.open("ab")
            self._data = self.data_path.open("wb")
        except OSError as exc:
            raise OutputUnwritable(f"cannot write beside the output ({self.dir}): {exc.strerror or exc}") from None
        _fsync_dir(self.dir)
        return self._data

    def reopen(self, commit: Commit) -> BinaryIO:
        """``rows`` cut back to ``commit`` and open for appending."""
        self._data = self.data_path.open("r+b")
        self._data.truncate(commit.bytes)
        self._data.seek(commit.bytes)
        self._log = self.log_path.open("ab")
        return self._data

    def commit(self, rows: int, stats: ScoreStats) -> Commit:
        data, log = self._data, self._log
        assert data is not None and log is not None, "commit before start"
        data.flush()
        os.fsync(data.fileno())
        entry = Commit(rows, data.tell(), asdict(stats))
        log.write(json.dumps(asdict(entry), separators=(",", ":")).encode() + b"\n")
        log.flush()
        os.fsync(log.fileno())
        return entry

    def close(self) -> None:
        for fh in (self._data, self._log):
            if fh is not None:
                fh.close()
        self._data = self._log = None

    def discard(self) -> None:
        self.close()
        if self.dir.exists():
            shutil.rmtree(self.dir)


class Committer:
    """Commits after ``every_rows`` rows or ``every_seconds`` seconds, whichever comes first."""

    def __init__(self, partial: Partial, every_rows: int, every_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.partial = partial
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self._clock = clock
        self._rows_at = 0
        self._time_at = clock()
        self.last: Commit | None = None

    def maybe(self, rows: int, flush: Callable[[], None], stats: Callable[[], ScoreStats]) -> None:
        if rows - self._rows_at >= self.every_rows or self._clock() - self._time_at >= self.every_seconds:
            self.now(rows, flush, stats)

    def now(self, rows: int, flush: Callable[[], None], stats: Callable[[], ScoreStats]) -> None:
        flush()
        self.last = self.partial.commit(rows, stats())
        self._rows_at, self._time_at = rows, self._clock()
