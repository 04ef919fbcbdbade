"""CSV rows in and out, never losing or reordering a row.

``CsvRows`` is the one parser: the scorer's ``CsvReader`` and the job splitter both read through
it. Reading: short rows padded, long rows flagged, oversized fields flagged per row (the lines come
from ``io.text``, which decodes and strips a BOM, so quoted newlines survive). An end of file inside
a quoted field (an unclosed quote, which would swallow the rest of the file into one field) stops
the file with ``MalformedCsv`` naming the line the field starts on. Writing: every input column in
order, then ``similarity``, ``cosine``, ``error`` and ``truncated``. TSV is the same with tabs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, TextIO

from ..errors import FieldTooLarge, MalformedCsv, NoCaptionColumn, NoUrlColumn, RaggedRow
from ..types import Record, ScoreResult

URL_COLUMNS = ("url", "image_url", "image")
CAPTION_COLUMNS = ("caption", "text")
OUTPUT_COLUMNS = ("similarity", "cosine", "error", "truncated")

#: Python's csv default. Larger fields become a ``field_too_large`` row error.
DEFAULT_MAX_FIELD = 128 * 1024
#: What the parser itself accepts before giving up on the file (an unmatched quote swallowing the
#: rest of a file stops here with a clear error instead of eating memory).
PARSER_FIELD_LIMIT = 64 * 1024 * 1024

_FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class CsvLayout:
    header: list[str]
    url_index: int
    caption_index: int


def _find(header: list[str], wanted: str | None, candidates: tuple[str, ...]) -> int | None:
    norm = [h.strip().lower() for h in header]
    if wanted is not None:
        for i, h in enumerate(header):
            if h == wanted:
                return i
        wanted_norm = wanted.strip().lower()
        return norm.index(wanted_norm) if wanted_norm in norm else None
    for c in candidates:
        if c in norm:
            return norm.index(c)
    return None


def detect_layout(header: list[str], url_column: str | None = None, caption_column: str | None = None) -> CsvLayout:
    u = _find(header, url_column, URL_COLUMNS)
    if u is None:
        asked = f"column {url_column!r}" if url_column else f"one of {', '.join(URL_COLUMNS)}"
        raise NoUrlColumn(f"no image URL column: expected {asked}; the header has {header!r}")
    c = _find(header, caption_column, CAPTION_COLUMNS)
    if c is None:
        asked = f"column {caption_column!r}" if caption_column else f"one of {', '.join(CAPTION_COLUMNS)}"
        raise NoCaptionColumn(f"no caption column: expected {asked}; the header has {header!r}")
    return CsvLayout(list(header), u, c)


class CsvRows:
    """The header, then each record's fields. Blank lines carry no fields and are not records; a
    row the parser cannot delimit stops the file with ``MalformedCsv`` (never a guess)."""

    def __init__(self, lines: Iterable[str], max_field: int = DEFAULT_MAX_FIELD, delimiter: str = ",") -> None:
        csv.field_size_limit(max(PARSER_FIELD_LIMIT, max_field))
        # strict: a closing quote followed by more text (an unescaped quote inside a quoted field,
        # which would silently merge rows) is an error with its line, never a guess.
        self._reader = csv.reader(lines, delimiter=delimiter, strict=True)
        while True:  # blank lines before the header are not the header
            header = self._next("header")
            if header is None:
                raise MalformedCsv("the input is empty: no header row")
            if header:
                break
        self.header: list[str] = header

    def _next(self, what: str) -> list[str] | None:
        start = self._reader.line_num + 1
        try:
            row = next(self._reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise MalformedCsv(
                    f"line {start}: a quoted field in the {what} that starts here is never closed (the file ends "
                    "inside it); close the quote, or double each quote character inside the field"
                ) from None
            if "expected after" in str(exc):
                raise MalformedCsv(
                    f"line {self._reader.line_num}: a closing quote is followed by more text in the same field: "
                    "a quote character inside a quoted field must be doubled"
                ) from None
            raise MalformedCsv(f"line {self._reader.line_num}: {exc}") from None
        return row

    def __iter__(self) -> Iterator[list[str]]:
        while (row := self._next("row")) is not None:
            if row:
                yield row


class CsvReader:
    """Iterate ``Record``s from a text stream. ``layout`` is known once the header is read."""

    def __init__(
        self,
        stream: Iterable[str],
        url_column: str | None = None,
        caption_column: str | None = None,
        max_field: int = DEFAULT_MAX_FIELD,
        delimiter: str = ",",
    ) -> None:
        self._rows = CsvRows(stream, max_field, delimiter)
        self.max_field = max_field
        self.layout = detect_layout(self._rows.header, url_column, caption_column)

    @property
    def header(self) -> list[str]:
        return self.layout.header

    def __iter__(self) -> Iterator[Record]:
        width = len(self.layout.header)
        ui, ci = self.layout.url_index, self.layout.caption_index
        for row in self._rows:
            error: RaggedRow | FieldTooLarge | None = None
            if len(row) > width:
                error = RaggedRow(f"{len(row)} fields, header has {width}; extra fields kept after the score columns")
            elif len(row) < width:
                row = row + [""] * (width - len(row))
            big = next((i for i, v in enumerate(row) if len(v) > self.max_field), None)
            if big is not None and error is None:
                name = self.layout.header[big] if big < width else f"field {big + 1}"
                error = FieldTooLarge(f"{name!r} has {len(row[big])} characters, limit {self.max_field}")
            yield Record(url=row[ui], caption=row[ci], row=row, error=error)


def excel_cell(value: str) -> str:
    """A cell a spreadsheet would read as a formula, prefixed with ``'`` (OWASP's CSV injection)."""
    return "'" + value if value.startswith(_FORMULA_TRIGGERS) else value


def excel_value(cell: Any) -> Any:
    """What ``excel_cell`` escaped, as it was (``'=1+1`` -> ``=1+1``); anything else unchanged."""
    if isinstance(cell, str) and cell.startswith("'") and cell[1:].startswith(_FORMULA_TRIGGERS):
        return cell[1:]
    return cell


def _cell(value: str, excel_safe: bool) -> str:
    return excel_cell(value) if excel_safe else value


def header_cells(header: Sequence[str], excel_safe: bool = False) -> list[str]:
    return [_cell(h, excel_safe) for h in header] + list(OUTPUT_COLUMNS)


def header_line(header: Sequence[str], excel_safe: bool = False) -> bytes:
    """The output's header row as bytes, exactly as ``CsvWriter`` writes it."""
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(header_cells(header, excel_safe))
    return buf.getvalue().encode("utf-8")


class CsvWriter:
    def __init__(
        self, stream: TextIO, header: Sequence[str], excel_safe: bool = False, write_header: bool = True
    ) -> None:
        self._writer = csv.writer(stream)
        self._width = len(header)
        self._excel_safe = excel_safe
        if write_header:  # parts of a chunked job are headerless; the merge writes it once
            self._writer.writerow(header_cells(header, excel_safe))

    def write(self, result: ScoreResult) -> None:
        self._writer.writerow(row_cells(result, self._width, self._excel_safe))


def row_cells(result: ScoreResult, width: int, excel_safe: bool = False, text: Callable[[Any], str] = str) -> list[str]:
    """One output row's cells: the input's ``width`` fields (padded), the four score columns, then
    a ragged row's extra fields. ``text`` turns a field into text (formats other than CSV)."""
    row = list(result.record.row)
    base, extra = row[:width], row[width:]
    base += [""] * (width - len(base))
    sim = "" if result.similarity is None else f"{result.similarity:.4f}"
    cos = "" if result.cosine_rounded is None else f"{result.cosine_rounded:.4f}"
    trunc = "true" if result.truncated else ""
    scores = [sim, cos, result.error_text, trunc]
    return [_cell(text(v), excel_safe) for v in base] + scores + [_cell(text(v), excel_safe) for v in extra]


def read_all(stream: IO[str]) -> list[list[str]]:
    """Small helper for tests and tools: every row of a CSV text stream."""
    csv.field_size_limit(PARSER_FIELD_LIMIT)
    return list(csv.reader(stream))
