"""Streaming CSV in and out, local or S3, that never loses or reorders a row.

Reading: ``utf-8-sig`` (a BOM never reaches the header), ``newline=""`` (quoted newlines survive),
short rows padded, long rows flagged, oversized fields flagged per row. Writing: every input column
in order, then ``similarity``, ``cosine``, ``error`` and ``truncated``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO
from urllib.parse import urlsplit

from .errors import FieldTooLarge, InputNotFound, MalformedCsv, NoCaptionColumn, NoUrlColumn, RaggedRow
from .records import Record, ScoreResult

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


class CsvReader:
    """Iterate ``Record``s from a text stream. ``layout`` is known once the header is read."""

    def __init__(
        self,
        stream: TextIO,
        url_column: str | None = None,
        caption_column: str | None = None,
        max_field: int = DEFAULT_MAX_FIELD,
    ) -> None:
        csv.field_size_limit(max(PARSER_FIELD_LIMIT, max_field))
        self._reader = csv.reader(stream)
        self.max_field = max_field
        try:
            header = next(self._reader)
        except StopIteration:
            raise MalformedCsv("the input is empty: no header row") from None
        except csv.Error as exc:
            raise MalformedCsv(f"header: {exc}") from None
        self.layout = detect_layout(header, url_column, caption_column)

    @property
    def header(self) -> list[str]:
        return self.layout.header

    def __iter__(self) -> Iterator[Record]:
        width = len(self.layout.header)
        ui, ci = self.layout.url_index, self.layout.caption_index
        while True:
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                # The parser cannot find the next row boundary: stop loudly, never guess.
                raise MalformedCsv(f"line {self._reader.line_num}: {exc}") from None
            if not row:
                continue  # a blank line carries no fields: not a row
            error = None
            if len(row) > width:
                error = RaggedRow(f"{len(row)} fields, header has {width}; extra fields kept after the score columns")
            elif len(row) < width:
                row = row + [""] * (width - len(row))
            big = next((i for i, v in enumerate(row) if len(v) > self.max_field), None)
            if big is not None and error is None:
                name = self.layout.header[big] if big < width else f"field {big + 1}"
                error = FieldTooLarge(f"{name!r} has {len(row[big])} characters, limit {self.max_field}")
            yield Record(url=row[ui], caption=row[ci], row=row, error=error)


def _cell(value: str, excel_safe: bool) -> str:
    if excel_safe and value.startswith(_FORMULA_TRIGGERS):
        return "'" + value
    return value


class CsvWriter:
    def __init__(self, stream: TextIO, header: list[str], excel_safe: bool = False, write_header: bool = True) -> None:
        self._writer = csv.writer(stream)
        self._width = len(header)
        self._excel_safe = excel_safe
        if write_header:  # parts of a chunked job are headerless; the merge writes it once
            self._writer.writerow([_cell(h, excel_safe) for h in header] + list(OUTPUT_COLUMNS))

    def write(self, result: ScoreResult) -> None:
        row = list(result.record.row) if result.record.row is not None else []
        base, extra = row[: self._width], row[self._width :]
        base += [""] * (self._width - len(base))
        sim = "" if result.similarity is None else f"{result.similarity:.4f}"
        cos = "" if result.cosine_rounded is None else f"{result.cosine_rounded:.4f}"
        trunc = "true" if result.truncated else ""
        out = [_cell(v, self._excel_safe) for v in base] + [sim, cos, result.error_text, trunc]
        self._writer.writerow(out + [_cell(v, self._excel_safe) for v in extra])


# --------------------------------------------------------------------------- local or s3 streams
def is_s3(uri: str) -> bool:
    return uri.lower().startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    key = parts.path.lstrip("/")
    if not parts.netloc or not key:
        raise InputNotFound(f"{uri!r} is not s3://bucket/key")
    return parts.netloc, key


@contextlib.contextmanager
def open_input(uri: str, s3_client: Any = None) -> Iterator[TextIO]:
    """Text stream over a local file, ``-`` (stdin) or an S3 object, read lazily."""
    if uri == "-":
        yield io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        return
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as exc:
            raise InputNotFound(f"cannot read {uri}: {exc.response.get('Error', {}).get('Code', exc)}") from None
        stream = io.TextIOWrapper(io.BufferedReader(_Readable(body)), encoding="utf-8-sig", newline="")
        try:
            yield stream
        finally:
            body.close()
        return
    path = Path(uri)
    if not path.is_file():
        raise InputNotFound(f"input file {uri!r} does not exist")
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        yield fh


class _Readable(io.RawIOBase):
    """Adapts a botocore/urllib3 stream to ``io.RawIOBase`` so TextIOWrapper can decode it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        return n


@contextlib.contextmanager
def open_output(uri: str, s3_client: Any = None) -> Iterator[TextIO]:
    """Text stream to a local file, ``-`` (stdout) or S3. Files are written to a temporary name
    and moved into place (S3: uploaded) only when the block finishes without error, so a failed run
    never leaves a half-written output behind."""
    if uri == "-":
        yield io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=True)
        return
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with tempfile.TemporaryFile("w+b") as tmp:
            text = io.TextIOWrapper(tmp, encoding="utf-8", newline="")
            yield text
            text.flush()
            text.detach()  # keep `tmp` open: the upload reads it
            tmp.seek(0)
            s3_client.upload_fileobj(tmp, bucket, key, ExtraArgs={"ContentType": "text/csv; charset=utf-8"})
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            yield fh
        shutil.move(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def default_output(input_uri: str) -> str:
    if input_uri == "-":
        return "-"
    stem, _ext = os.path.splitext(input_uri)
    return f"{stem}_scored.csv"


def read_all(stream: IO[str]) -> list[list[str]]:
    """Small helper for tests and tools: every row of a CSV text stream."""
    csv.field_size_limit(PARSER_FIELD_LIMIT)
    return list(csv.reader(stream))
