"""Cutting a CSV into chunks by records (never inside a quoted newline) and putting scored parts
back together. Pure stream functions: the S3/SQS plumbing lives in ``handler.jobs``."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from .csvio import OUTPUT_COLUMNS, PARSER_FIELD_LIMIT, detect_layout
from .errors import MalformedCsv


@dataclass(frozen=True)
class Chunk:
    index: int
    rows: int
    text: str  # a complete CSV: the input header, then this chunk's records


def split_csv(
    stream: TextIO, chunk_rows: int, url_column: str | None = None, caption_column: str | None = None
) -> tuple[list[str], Iterator[Chunk]]:
    """Parse ``stream`` once; return the header and a lazy iterator of chunks of ``chunk_rows``
    records each. The header is checked first (``NoUrlColumn``/``NoCaptionColumn``/``MalformedCsv``
    before any chunk is produced). Blank lines are not records, as in ``CsvReader``."""
    csv.field_size_limit(PARSER_FIELD_LIMIT)
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        raise MalformedCsv("the input is empty: no header row") from None
    except csv.Error as exc:
        raise MalformedCsv(f"header: {exc}") from None
    detect_layout(header, url_column, caption_column)

    def chunks() -> Iterator[Chunk]:
        index, buf, writer, n = 0, None, None, 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise MalformedCsv(f"line {reader.line_num}: {exc}") from None
            if not row:
                continue
            if writer is None:
                buf = io.StringIO(newline="")
                writer = csv.writer(buf)
                writer.writerow(header)
            writer.writerow(row)
            n += 1
            if n == chunk_rows:
                yield Chunk(index, n, buf.getvalue())  # type: ignore[union-attr]
                index, buf, writer, n = index + 1, None, None, 0
        if writer is not None:
            yield Chunk(index, n, buf.getvalue())  # type: ignore[union-attr]

    return header, chunks()


def output_header_line(header: list[str]) -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(list(header) + list(OUTPUT_COLUMNS))
    return buf.getvalue().encode("utf-8")


def merge_parts(header: list[str], parts: Iterator[BinaryIO], out: BinaryIO, block: int = 1 << 20) -> None:
    """Header once, then each headerless part's bytes in order."""
    out.write(output_header_line(header))
    for part in parts:
        while True:
            data = part.read(block)
            if not data:
                break
            out.write(data)
