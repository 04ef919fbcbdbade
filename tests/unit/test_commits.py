"""The commit log: what a crash leaves is read back as the last complete commit."""

from __future__ import annotations

import io

import pytest

from similarity.errors import ResumeMismatch
from similarity.io.text import TextLines
from similarity.pipeline.commits import Committer, Partial
from similarity.pipeline.files import ErrorFilter
from similarity.types import ScoreStats


def test_a_torn_last_commit_line_does_not_count(tmp_path) -> None:
    p = Partial(tmp_path / "out.csv.partial")
    data = p.start({"input": "x"})
    data.write(b"header\n")
    p.commit(0, ScoreStats())
    data.write(b"row1\nrow2\n")
    p.commit(2, ScoreStats(rows=2, scored=2))
    data.write(b"row3\n")  # written, never committed
    p.close()
    with p.log_path.open("ab") as log:
        log.write(b'{"rows": 3, "bytes"')  # a crash in the middle of the commit line
    last = p.last_commit()
    assert (last.rows, last.bytes, last.stats["scored"]) == (2, len(b"header\nrow1\nrow2\n"), 2)
    fh = p.reopen(last)
    fh.write(b"row3 again\n")
    p.close()
    assert p.data_path.read_bytes() == b"header\nrow1\nrow2\nrow3 again\n"


def test_identity_check_names_what_changed(tmp_path) -> None:
    p = Partial(tmp_path / "o.partial")
    p.start({"input": "a.csv", "options": {"encoding": None}})
    p.close()
    p.check({"input": "a.csv", "options": {"encoding": None}})
    with pytest.raises(ResumeMismatch, match=r"options: was \{'encoding': None\}, now \{'encoding': 'cp1252'\}"):
        p.check({"input": "a.csv", "options": {"encoding": "cp1252"}})


def test_committer_commits_by_rows_or_time(tmp_path) -> None:
    now = [0.0]
    p = Partial(tmp_path / "o.partial")
    p.start({})
    c = Committer(p, every_rows=10, every_seconds=5, clock=lambda: now[0])
    flushes: list[int] = []
    for rows in range(1, 25):
        c.maybe(rows, lambda r=rows: flushes.append(r), ScoreStats)
    assert flushes == [10, 20]
    now[0] = 6.0
    c.maybe(21, lambda: flushes.append(21), ScoreStats)
    assert flushes == [10, 20, 21]
    p.close()


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 4096])
def test_text_lines_split_only_on_line_ends_whatever_the_chunks(chunk) -> None:
    text = "a,b\r\nc\u2028d\x0ce\rf\n\ng\r\n" + "é" * 7 + "\n"
    got = list(TextLines(io.BufferedReader(io.BytesIO(text.encode())), chunk=chunk))
    assert got == ["a,b\r\n", "c\u2028d\x0ce\r", "f\n", "\n", "g\r\n", "é" * 7 + "\n"]


def test_error_filter_codes_and_classes() -> None:
    f = ErrorFilter.parse("timeout, http_5xx,http_404")
    assert f.matches("timeout: 30 s") and f.matches("http_503: x") and f.matches("http_404")
    assert not f.matches("http_403: no") and not f.matches("") and not f.matches(None)
