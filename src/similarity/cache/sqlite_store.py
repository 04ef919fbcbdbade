"""The local store: one SQLite file (stdlib ``sqlite3``), size-bounded, least recently used out.

- WAL journal, ``synchronous=NORMAL``: readers never wait for the writer, and a cache may lose its
  last transaction on power loss;
- the byte total lives in the file (kept by triggers), so several processes sharing the file (two
  CLI runs at once) evict against the same count;
- over ``max_bytes``, the least recently read entries go until the total is back under 90 % of it;
- reads mark entries used, at most once a minute per entry, in one UPDATE per batch;
- values are raw bytes: nothing is ever unpickled;
- a file that is not a SQLite database (or a damaged one) is replaced by an empty store: at open,
  or when a read or write first finds it damaged (a page past the first), with one warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from .store import KINDS, StoreStats, StoreUnavailable

log = logging.getLogger(__name__)

# 16 KiB pages: a 2 KiB entry is 2.2 KiB with its key, and 4 KiB pages would hold one each (the
# file twice the entries' size); 16 KiB pages hold seven. The page size only applies to a new file.
# The WAL is checkpointed every 256 pages and cut back to 4 MiB, so it does not keep its peak size.
_SCHEMA = """
PRAGMA page_size=16384;
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
PRAGMA wal_autocheckpoint=256;
PRAGMA journal_size_limit=4194304;
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, atime REAL NOT NULL, nbytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_atime ON entries(atime);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('bytes', 0);
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
    UPDATE meta SET value = value + NEW.nbytes WHERE name = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
    UPDATE meta SET value = value - OLD.nbytes WHERE name = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS entries_upd AFTER UPDATE OF nbytes ON entries BEGIN
    UPDATE meta SET value = value - OLD.nbytes + NEW.nbytes WHERE name = 'bytes'; END;
"""
# An UPSERT, not INSERT OR REPLACE: REPLACE deletes without firing the delete trigger.
_PUT = (
    "INSERT INTO entries (key, value, atime, nbytes) VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
    "value = excluded.value, atime = excluded.atime, nbytes = excluded.nbytes"
)
#: Bytes counted per entry besides its key and value (row header, the key again in the index).
ROW_OVERHEAD = 48
#: Eviction brings the total down to this share of the limit, so it runs once per many puts.
EVICT_TO = 0.9
#: Reads re-mark an entry as used at most this often (seconds): fewer writes for hot entries.
TOUCH_EVERY = 60.0
_BATCH = 500  # keys per statement (SQLite's host parameter limit is 999 on old builds)
#: SQLITE_CORRUPT and SQLITE_NOTADB (primary result codes): the file, not the moment, is at fault.
_DAMAGED_CODES = frozenset({11, 26})


def is_damaged(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file is damaged ("database disk image is malformed", "file is not
    a database"), not that it is busy, locked, full or unreadable."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _DAMAGED_CODES
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _chunks(items: Sequence[str], n: int = _BATCH) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class SqliteStore:
    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self.max_bytes = max_bytes
        self.name = f"sqlite:{self.path}"
        self._timeout = timeout
        self._lock = threading.Lock()
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file this connection has
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # cannot open, locked: not the file's fault
                raise StoreUnavailable(f"{self.name}: {exc}") from None
            log.warning("cache file %s is damaged (%s); starting an empty one", self.path, exc)
            self._remove_files()
            try:
                self._db = self._connect()
            except (sqlite3.Error, OSError) as again:
                raise StoreUnavailable(f"{self.name}: {again}") from None
        except OSError as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Owner only: embeddings say what a user's images were. SQLite gives the -wal and -shm
        # files the database file's mode, so the file is made 0600 before SQLite first opens it.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(f"{self.path}{suffix}", 0o600)
            except OSError:
                pass
        db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
        try:
            db.executescript(_SCHEMA)
            st = os.stat(self.path)
        except BaseException:
            db.close()
            raise
        self._file = (st.st_dev, st.st_ino)
        return db

    def _replace_damaged(self, exc: sqlite3.Error) -> None:
        """A read or write found the file damaged: close it, remove it (unless another process
        sharing it has replaced it already) and start an empty one, with one warning. Called with
        the lock held; raises ``StoreUnavailable`` when the new file cannot be made."""
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._file
        except OSError:
            same = False
        if same:
            log.warning("cache file %s is damaged (%s); starting an empty one", self.path, exc)
            self._remove_files()
        try:
            self._db = self._connect()
        except (sqlite3.Error, OSError) as again:
            # Left closed: every later call raises StoreUnavailable (sqlite3.ProgrammingError)
            # until the cache's retry, which finds the file the same way again.
            raise StoreUnavailable(f"{self.name}: {again}") from None

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        now = self._clock()
        found: dict[str, bytes] = {}
        with self._lock:
            try:
                for chunk in _chunks(keys):
                    marks = ",".join("?" * len(chunk))
                    rows = self._db.execute(f"SELECT key, value FROM entries WHERE key IN ({marks})", list(chunk))
                    found.update((k, v) for k, v in rows if isinstance(v, bytes))
                for chunk in _chunks(list(found)):
                    marks = ",".join("?" * len(chunk))
                    self._db.execute(
                        f"UPDATE entries SET atime = ? WHERE atime < ? AND key IN ({marks})",
                        [now, now - TOUCH_EVERY, *chunk],
                    )
            except sqlite3.Error as exc:
                if not is_damaged(exc):
                    raise StoreUnavailable(f"{self.name}: {exc}") from None
                self._replace_damaged(exc)
                return [None] * len(keys)  # the new file is empty
        return [found.get(k) for k in keys]

    def put_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        now = self._clock()
        rows = [(k, v, now, len(k) * 2 + len(v) + ROW_OVERHEAD) for k, v in items.items()]
        with self._lock:
            try:
                self._put(rows)
            except sqlite3.Error as exc:
                if not is_damaged(exc):
                    raise StoreUnavailable(f"{self.name}: {exc}") from None
                self._replace_damaged(exc)
                try:
                    self._put(rows)  # into the new, empty file
                except sqlite3.Error as again:
                    raise StoreUnavailable(f"{self.name}: {again}") from None

    def _put(self, rows: list[tuple[str, bytes, float, int]]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(_PUT, rows)
            self._evict_if_over()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _total(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()
        return int(row[0]) if row else 0

    def _evict_if_over(self) -> None:
        total = self._total()
        if total <= self.max_bytes:
            return
        excess = total - int(self.max_bytes * EVICT_TO)
        victims: list[str] = []
        freed = 0
        while freed < excess:
            page = self._db.execute(
                "SELECT key, nbytes FROM entries ORDER BY atime LIMIT ? OFFSET ?", (1000, len(victims))
            ).fetchall()
            if not page:
                break
            for key, nbytes in page:
                victims.append(key)
                freed += nbytes
                if freed >= excess:
                    break
        self._db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in victims])

    def stats(self) -> StoreStats:
        with self._lock:
            try:
                counts = dict(self._db.execute("SELECT substr(key, 1, 1), COUNT(*) FROM entries GROUP BY 1").fetchall())
                total = self._total()
            except sqlite3.Error as exc:
                if not is_damaged(exc):
                    raise StoreUnavailable(f"{self.name}: {exc}") from None
                self._replace_damaged(exc)
                counts, total = {}, 0
        files = 0
        for suffix in ("", "-wal"):
            try:
                files += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return StoreStats(
            store=self.name,
            entries={name: int(counts.get(prefix, 0)) for prefix, name in KINDS.items()},
            bytes=total,
            max_bytes=self.max_bytes,
            extra={"file_bytes": files},
        )

    def clear(self) -> int:
        with self._lock:
            try:
                n = int(self._db.execute("DELETE FROM entries").rowcount)
                self._db.execute("VACUUM")  # give the disk back
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                if not is_damaged(exc):
                    raise StoreUnavailable(f"{self.name}: {exc}") from None
                self._replace_damaged(exc)  # what it held is gone either way
                n = 0
        return n

    def close(self) -> None:
        with self._lock:
            self._db.close()
