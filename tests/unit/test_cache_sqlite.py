"""The local store: a real SQLite file, bounded in bytes, least recently used out, shared safely by
several processes' connections, and a damaged file replaced rather than fatal."""

from __future__ import annotations

import logging
import os
import stat
import threading

import pytest

from similarity.cache.sqlite_store import ROW_OVERHEAD, SqliteStore
from similarity.cache.store import StoreUnavailable

VALUE = b"v" * 2048


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t

    def tick(self, s: float = 61.0) -> None:
        self.t += s


def _size(key: str, value: bytes = VALUE) -> int:
    return 2 * len(key) + len(value) + ROW_OVERHEAD


def test_round_trip_and_missing_keys(tmp_path) -> None:
    s = SqliteStore(tmp_path / "c.db", 10**7)
    s.put_many({"i:a": b"1", "c:b": b"22"})
    assert s.get_many(["i:a", "nope", "c:b"]) == [b"1", None, b"22"]
    assert s.get_many([]) == []
    s.put_many({"i:a": b"333"})  # overwritten, counted once
    st = s.stats()
    assert st.entries == {"images": 1, "captions": 1, "urls": 0}
    assert st.bytes == _size("i:a", b"333") + _size("c:b", b"22")
    for name in ("c.db", "c.db-wal", "c.db-shm"):  # embeddings say what a user's images were: owner only
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) & 0o077 == 0, name


def test_least_recently_used_entries_go_first_and_the_total_stays_bounded(tmp_path) -> None:
    clock = Clock()
    limit = 20 * _size("i:000")
    s = SqliteStore(tmp_path / "c.db", limit, clock=clock)
    s.put_many({"i:hot": VALUE})
    for i in range(60):
        clock.tick()
        s.put_many({f"i:{i:03d}": VALUE})
        assert s.get_many(["i:hot"]) == [VALUE]  # read every time: most recently used
        assert s.stats().bytes <= limit
    alive = s.get_many([f"i:{i:03d}" for i in range(60)])
    assert alive[-1] == VALUE and alive[0] is None  # the newest stay, the oldest went
    assert s.get_many(["i:hot"]) == [VALUE]  # old but read often: kept
    assert 10 <= sum(v is not None for v in alive) < 20


def test_two_connections_share_one_byte_total(tmp_path) -> None:
    clock = Clock()
    limit = 10 * _size("i:a00")
    a = SqliteStore(tmp_path / "c.db", limit, clock=clock)
    b = SqliteStore(tmp_path / "c.db", limit, clock=clock)  # another process's connection
    a.put_many({f"i:a{i:02d}": VALUE for i in range(8)})
    assert b.stats().bytes == 8 * _size("i:a00")
    clock.tick()
    b.put_many({f"i:b{i:02d}": VALUE for i in range(8)})  # over the limit: a's older entries go
    assert a.stats().bytes <= limit
    assert a.get_many(["i:a00"]) == [None] and b.get_many(["i:b07"]) == [VALUE]


def test_damaged_file_is_replaced_with_an_empty_store(tmp_path, caplog) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not a database" * 500)
    with caplog.at_level(logging.WARNING):
        s = SqliteStore(path, 10**7)
    assert "damaged" in caplog.text
    s.put_many({"i:x": b"1"})
    assert s.get_many(["i:x"]) == [b"1"]


def test_unusable_location_is_store_unavailable(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreUnavailable):
        SqliteStore(blocker / "sub" / "c.db", 10**7)


def test_closed_store_fails_as_unavailable_not_with_sqlite_errors(tmp_path) -> None:
    s = SqliteStore(tmp_path / "c.db", 10**7)
    s.close()
    with pytest.raises(StoreUnavailable):
        s.get_many(["i:x"])
    with pytest.raises(StoreUnavailable):
        s.put_many({"i:x": b"1"})


def test_clear_deletes_everything_and_reports_how_much(tmp_path) -> None:
    s = SqliteStore(tmp_path / "c.db", 10**7)
    s.put_many({f"u:{i}": VALUE for i in range(30)})
    assert s.clear() == 30
    assert s.stats().bytes == 0 and s.stats().entries["urls"] == 0
    assert s.get_many(["u:1"]) == [None]


def test_threads_share_one_store(tmp_path) -> None:
    s = SqliteStore(tmp_path / "c.db", 10**8)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                s.put_many({f"c:{n}-{i}": str(i).encode()})
                assert s.get_many([f"c:{n}-{i}"]) == [str(i).encode()]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.stats().entries["captions"] == 400


def _damage_entries(path) -> None:
    """Overwrite the root pages of the entries table and its indexes: the file still opens (its
    schema page and the meta table are intact), and every read or write of an entry is
    "database disk image is malformed"."""
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    roots = [r for (r,) in db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'entries' AND rootpage")]
    db.close()
    with open(path, "r+b") as f:
        for root in roots:
            f.seek((root - 1) * page)
            f.write(os.urandom(page))
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.unlink(f"{path}{suffix}")


@pytest.mark.parametrize("first", ["get", "put", "stats"])
def test_a_file_damaged_past_its_first_page_is_replaced_on_first_use(tmp_path, caplog, first) -> None:
    path = tmp_path / "c.db"
    s = SqliteStore(path, 10**7)
    s.put_many({f"i:{i:04d}": VALUE for i in range(200)})
    s.close()
    _damage_entries(path)
    with caplog.at_level(logging.WARNING):
        s = SqliteStore(path, 10**7)  # opens: the damage is past what opening reads
        if first == "get":
            assert s.get_many(["i:0001", "i:0150"]) == [None, None]
        elif first == "put":
            s.put_many({"i:new": b"1"})
        else:
            assert s.stats().bytes == 0
        s.put_many({"i:x": b"1"})
        assert s.get_many(["i:x", "i:0001"]) == [b"1", None]
        if first == "put":
            assert s.get_many(["i:new"]) == [b"1"]  # the write that found the damage went to the new file
        s.close()
        again = SqliteStore(path, 10**7)  # reopened: the new file, intact
        assert again.get_many(["i:x"]) == [b"1"]
        assert again.stats().bytes == _size("i:x", b"1") + (_size("i:new", b"1") if first == "put" else 0)
    assert sum("damaged" in r.getMessage() for r in caplog.records) == 1


def test_a_connection_to_a_file_another_replaced_reopens_without_removing_it(tmp_path, caplog) -> None:
    path = tmp_path / "c.db"
    s = SqliteStore(path, 10**7)
    s.put_many({f"i:{i:04d}": VALUE for i in range(200)})
    s.close()
    _damage_entries(path)
    a = SqliteStore(path, 10**7)
    b = SqliteStore(path, 10**7)  # another process sharing the file
    with caplog.at_level(logging.WARNING):
        assert a.get_many(["i:0001"]) == [None]  # a replaces it ...
        a.put_many({"i:a": b"1"})
        assert b.get_many(["i:0001"]) == [None]  # ... b finds its old file damaged, and a's new one
    assert b.get_many(["i:a"]) == [b"1"]  # not removed again: a's entry is still there
    assert sum("damaged" in r.getMessage() for r in caplog.records) == 1


def test_busy_and_locked_are_not_damage() -> None:
    import sqlite3

    from similarity.cache.sqlite_store import is_damaged

    assert not is_damaged(sqlite3.OperationalError("database is locked"))
    assert not is_damaged(sqlite3.ProgrammingError("Cannot operate on a closed database."))
    assert is_damaged(sqlite3.DatabaseError("database disk image is malformed"))
    assert is_damaged(sqlite3.DatabaseError("file is not a database"))
