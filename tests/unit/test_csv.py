"""CSV edge cases: every row comes out, in order, whatever the input looks like."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from similarity.errors import MalformedCsv, NoCaptionColumn, NoUrlColumn
from similarity.io.csvfile import CsvReader, CsvWriter, detect_layout, read_all
from similarity.types import ScoreResult


def _roundtrip(text: str, **kw) -> list[list[str]]:
    reader = CsvReader(io.StringIO(text, newline=""), **kw)
    out = io.StringIO(newline="")
    writer = CsvWriter(out, reader.header)
    for rec in reader:
        writer.write(ScoreResult(rec, error=rec.error))
    out.seek(0)
    return read_all(out)


def test_bom_does_not_leak_into_header(tmp_path) -> None:
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffurl,caption\nhttp://x/a.png,a cat\n".encode())
    from similarity.io.streams import open_input

    with open_input(str(p)) as fh:
        reader = CsvReader(fh)
        assert reader.header == ["url", "caption"]
        assert [r.url for r in reader] == ["http://x/a.png"]


def test_quoted_newlines_and_unicode_and_formula() -> None:
    text = 'url,caption,id\r\nu1,"two\nlines",1\r\nu2,"=HYPERLINK(""x"")",2\r\nu3,日本語 ✓ émoji 🐱,3\r\n'
    rows = _roundtrip(text)
    assert rows[0] == ["url", "caption", "id", "similarity", "cosine", "error", "truncated"]
    assert [r[1] for r in rows[1:]] == ["two\nlines", '=HYPERLINK("x")', "日本語 ✓ émoji 🐱"]
    assert [r[2] for r in rows[1:]] == ["1", "2", "3"]


def test_excel_safe_neutralises_formulas() -> None:
    reader = CsvReader(io.StringIO("url,caption\nu,=1+1\nu,+cmd\nu,fine\n", newline=""))
    out = io.StringIO(newline="")
    w = CsvWriter(out, reader.header, excel_safe=True)
    for rec in reader:
        w.write(ScoreResult(rec))
    out.seek(0)
    assert [r[1] for r in read_all(out)[1:]] == ["'=1+1", "'+cmd", "fine"]


def test_empty_fields_and_ragged_rows_are_kept() -> None:
    text = "url,caption,extra\nu1,,x\n,cap,y\nu3\nu4,c4,z,SURPLUS,MORE\nu5,c5,w\n"
    reader = CsvReader(io.StringIO(text, newline=""))
    recs = list(reader)
    assert len(recs) == 5
    assert recs[2].row == ["u3", "", ""]  # short row padded
    assert recs[3].error is not None and recs[3].error.code == "ragged_row"
    rows = _roundtrip(text)
    assert len(rows) == 6
    assert rows[4][:3] == ["u4", "c4", "z"] and rows[4][-2:] == ["SURPLUS", "MORE"]  # nothing dropped
    assert rows[4][5].startswith("ragged_row")
    assert [r[0] for r in rows[1:]] == ["u1", "", "u3", "u4", "u5"]


def test_field_over_128k_is_a_row_error_not_a_crash() -> None:
    big = "y" * 200_000
    text = f"url,caption\nu1,short\nu2,{big}\nu3,after\n"
    rows = _roundtrip(text)
    assert [r[0] for r in rows[1:]] == ["u1", "u2", "u3"]
    assert rows[2][1] == big  # kept verbatim
    assert rows[2][4].startswith("field_too_large")
    assert rows[3][4] == ""


@pytest.mark.parametrize(
    "text",
    [
        # issue 22 B6: the quote opened on line 2 swallows the next two lines into one caption
        'url,caption\n1,"a red circle\n2,a blue square\n3,a green triangle\n',
        'url,caption\nu0,fine\nu1,"never closed\n' + ("z" * 1000 + "\n") * 200,  # a big swallow
        'url,caption\nu0,fine\nu1,"no newline at the end',
        'url,caption\nu0,"ok"\nu1,"doubled ""quotes"" then no close\nu2,x\n',
        'url,"caption\nu0,x\n',  # in the header
    ],
)
def test_end_of_file_inside_a_quoted_field_is_malformed(text) -> None:
    # Before: the rest of the file became one caption and the run exited 0 with fewer rows.
    with pytest.raises(MalformedCsv, match="never closed"):
        list(CsvReader(io.StringIO(text, newline="")))


def test_unclosed_quote_names_the_line_it_opens_on() -> None:
    with pytest.raises(MalformedCsv, match=r"^malformed_csv: line 3:"):
        list(CsvReader(io.StringIO('url,caption\nu0,ok\nu1,"open\nu2,x\nu3,y\n', newline="")))


def test_quote_closed_by_a_later_rows_quote_is_malformed() -> None:
    # The same class when a later row has quotes: the field closes there and text follows the quote.
    text = 'url,caption\nu1,"never closed\nu2,"quoted"\nu3,c\n'
    with pytest.raises(MalformedCsv, match="line 3: a closing quote is followed by more text"):
        list(CsvReader(io.StringIO(text, newline="")))


def test_job_splitter_refuses_an_unclosed_quote_too() -> None:
    from similarity.io.chunking import split_csv

    _, chunks = split_csv(io.StringIO('url,caption\nu,"open\nv,w\n', newline=""), 10)
    with pytest.raises(MalformedCsv, match="never closed"):
        list(chunks)


def test_blank_lines_are_not_rows() -> None:
    rows = _roundtrip("url,caption\n\nu1,c1\n\n\nu2,c2\n")
    assert [r[0] for r in rows[1:]] == ["u1", "u2"]


@pytest.mark.parametrize(
    ("header", "url", "caption"),
    [
        (["url", "caption"], 0, 1),
        (["id", "image_url", "text"], 1, 2),
        (["Image", " Caption "], 0, 1),
        (["text", "image"], 1, 0),
    ],
)
def test_column_detection(header, url, caption) -> None:
    layout = detect_layout(header)
    assert (layout.url_index, layout.caption_index) == (url, caption)


def test_column_overrides_and_missing_columns() -> None:
    assert detect_layout(["link", "desc"], "link", "desc").url_index == 0
    with pytest.raises(NoUrlColumn, match="link"):
        detect_layout(["link", "caption"])
    with pytest.raises(NoCaptionColumn):
        detect_layout(["url", "desc"])
    with pytest.raises(MalformedCsv, match="empty"):
        CsvReader(io.StringIO(""))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=30), st.text(max_size=60)), max_size=30))
def test_roundtrip_preserves_every_row(rows) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["url", "caption"])
    w.writerows(rows)
    out = _roundtrip(buf.getvalue())
    assert [r[:2] for r in out[1:]] == [list(r) for r in rows]
