"""Cutting a CSV into chunks by records (never inside a quoted newline) and putting scored parts
back together. Pure stream functions: S3 and SQS live in ``similarity.jobs``."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .csvfile import CsvRows, detect_layout, header_line


@dataclass(frozen=True)
class Chunk:
    index: int
    rows: int
    text: str  # a complete CSV: the input header, then this chunk's records


def split_csv(
    stream: Iterable[str], chunk_rows: int, url_column: str | None = None, caption_column: str | None = None
) -> tuple[list[str], Iterator[Chunk]]:
    """Parse ``stream`` once (with the scorer's parser); return the header and a lazy iterator of
    chunks of ``chunk_rows`` records each. The header is checked first (``NoUrlColumn``,
    ``NoCaptionColumn``, ``MalformedCsv`` before any chunk is produced)."""
    rows = CsvRows(stream)
    header = rows.header
    detect_layout(header, url_column, caption_column)

    def chunks() -> Iterator[Chunk]:
        index, n = 0, 0
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        for row in rows:
            if n == 0:
                writer.writerow(header)
            writer.writerow(row)
            n += 1
            if n == chunk_rows:
                yield Chunk(index, n, buf.getvalue())
                index, n = index + 1, 0
                buf = io.StringIO(newline="")
                writer = csv.writer(buf)
        if n:
            yield Chunk(index, n, buf.getvalue())

    return header, chunks()


def merge_parts(
    header: list[str], parts: Iterable[BinaryIO], out: BinaryIO, excel_safe: bool = False, block: int = 1 << 20
) -> None:
    """Header once, then each headerless part's bytes in order."""
    out.write(header_line(header, excel_safe))
    for part in parts:
        while True:
            data = part.read(block)
            if not data:
                break
            out.write(data)
