"""One reader interface over every format: a header, the URL and caption columns, and ``Record``s
in file order, with the same row contract for each format (``tests/integration/test_formats.py``).

- CSV / TSV: ``csvfile.CsvReader`` (fields are strings).
- JSON Lines: one JSON object per line; the header is the first object's keys. A missing key is
  an empty field (null); blank lines are not rows; a line that is not a JSON object stops the file
  (``MalformedInput`` with its line), like a CSV row that cannot be delimited. When the output has
  fixed columns (CSV, TSV, Parquet), an object with keys the first one lacks is ``ragged_row``
  and keeps them after the score columns; a JSON Lines output keeps any keys.
- Parquet: the columns with their types; ``Record.row`` holds the values as pyarrow gives them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from ..errors import FieldTooLarge, MalformedInput, RaggedRow, RowError
from ..types import Record
from .csvfile import DEFAULT_MAX_FIELD, CsvLayout, CsvReader, detect_layout
from .formats import FileFormat, Format
from .streams import Source
from .text import TextLines


class KeyedRow(list[Any]):
    """A JSON Lines row: the values in header order, then the object's other keys' values;
    ``keys`` names them all, so a JSON Lines output writes them back under their names."""

    keys: tuple[str, ...] = ()


class RowReader(Protocol):
    header: list[str]
    layout: CsvLayout
    #: The input's pyarrow schema (Parquet), so a Parquet output keeps the column types.
    schema: Any

    def __iter__(self) -> Iterator[Record]: ...


def as_text(value: Any) -> str:
    """A field as text for CSV/TSV and for the URL and caption (JSON for lists and objects)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    iso = getattr(value, "isoformat", None)
    return str(iso()) if callable(iso) else str(value)


def _field(value: Any) -> str | None:
    return None if value is None else as_text(value)


def _too_large(header: Sequence[str], row: Sequence[Any], limit: int) -> RowError | None:
    """The CSV contract's ``field_too_large`` for typed rows: a text value over the field limit."""
    for i, value in enumerate(row):
        if isinstance(value, str) and len(value) > limit:
            name = header[i] if i < len(header) else f"field {i + 1}"
            return FieldTooLarge(f"{name!r} has {len(value)} characters, limit {limit}")
    return None


class CsvRowReader:
    schema: Any = None

    def __init__(self, lines: Iterable[str], delimiter: str, url_column: str | None, caption_column: str | None,
                 max_field: int) -> None:  # fmt: skip
        self._reader = CsvReader(lines, url_column, caption_column, max_field, delimiter)
        self.layout = self._reader.layout
        self.header = self._reader.header

    def __iter__(self) -> Iterator[Record]:
        return iter(self._reader)


class JsonlReader:
    schema: Any = None

    def __init__(self, lines: Iterable[str], url_column: str | None, caption_column: str | None,
                 fixed_columns: bool, max_field: int = DEFAULT_MAX_FIELD) -> None:  # fmt: skip
        self._max_field = max_field
        self._lines = iter(lines)
        self._line = 0
        self._fixed = fixed_columns
        first = self._next()
        if first is None:
            raise MalformedInput("the input is empty: no JSON object")
        self._first: dict[str, Any] | None = first
        self.header = list(first)
        self.layout = detect_layout(self.header, url_column, caption_column)

    def _next(self) -> dict[str, Any] | None:
        for line in self._lines:
            self._line += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise MalformedInput(f"line {self._line}: not valid JSON ({str(exc)[:120]})") from None
            if not isinstance(obj, dict):
                raise MalformedInput(f"line {self._line}: a JSON {type(obj).__name__}, not an object")
            return obj
        return None

    def __iter__(self) -> Iterator[Record]:
        header = self.header
        known = set(header)
        ui, ci = self.layout.url_index, self.layout.caption_index
        while True:
            obj = self._first if self._first is not None else self._next()
            self._first = None
            if obj is None:
                return
            row = KeyedRow(obj.get(k) for k in header)
            extra = [k for k in obj if k not in known]
            row.keys = (*header, *extra)
            row.extend(obj[k] for k in extra)
            error: RowError | None = None
            if extra and self._fixed:
                error = RaggedRow(
                    f"keys {', '.join(extra)[:100]} are not in the first object; kept after the score columns"
                )
            error = error or _too_large(row.keys, row, self._max_field)
            yield Record(url=_field(row[ui]), caption=_field(row[ci]), row=row, error=error)


class ParquetReader:
    def __init__(self, source: Source, url_column: str | None, caption_column: str | None,
                 max_field: int = DEFAULT_MAX_FIELD, batch_rows: int = 1024) -> None:  # fmt: skip
        pq = require_pyarrow("reading Parquet").parquet
        self._source = source
        self._max_field = max_field
        where: Any = source.path
        if where is None:  # stdin, S3, gzip: Parquet's footer is at the end, so spool to a file first
            self._spool = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the reader
            shutil.copyfileobj(source.stream, self._spool, 1 << 20)
            self._spool.seek(0)
            where = self._spool
        try:
            self._file = pq.ParquetFile(where)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
            raise MalformedInput(f"{source.uri} is not a Parquet file: {str(exc)[:200]}") from None
        self.schema = self._file.schema_arrow
        self.header = list(self.schema.names)
        self.layout = detect_layout(self.header, url_column, caption_column)
        self.rows_total = self._file.metadata.num_rows
        self.rows_read = 0
        self._batch_rows = batch_rows

    def fraction(self) -> float | None:
        return self.rows_read / self.rows_total if self.rows_total else None

    def __iter__(self) -> Iterator[Record]:
        ui, ci = self.layout.url_index, self.layout.caption_index
        try:
            batches = self._file.iter_batches(batch_size=self._batch_rows)
            for batch in batches:
                columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                for values in zip(*columns, strict=True):
                    self.rows_read += 1
                    row = list(values)
                    error = _too_large(self.header, row, self._max_field)
                    yield Record(url=_field(row[ui]), caption=_field(row[ci]), row=row, error=error)
        except MalformedInput:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("pyarrow") or isinstance(exc, OSError):
                raise MalformedInput(f"{self._source.uri}: unreadable Parquet data: {str(exc)[:200]}") from None
            raise


def require_pyarrow(what: str) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError(f"{what} needs pyarrow: pip install '.[parquet]'") from None
    return pyarrow


def open_reader(
    source: Source,
    fmt: FileFormat,
    *,
    url_column: str | None = None,
    caption_column: str | None = None,
    encoding: str | None = None,
    max_field: int = DEFAULT_MAX_FIELD,
    fixed_columns: bool = True,
) -> RowReader:
    """A reader for ``source`` in ``fmt`` (the source is already gunzipped when ``fmt.gzip``)."""
    if fmt.kind is Format.PARQUET:
        return ParquetReader(source, url_column, caption_column, max_field)
    lines = TextLines(source.stream, encoding)
    if fmt.kind is Format.JSONL:
        return JsonlReader(lines, url_column, caption_column, fixed_columns, max_field)
    return CsvRowReader(lines, "\t" if fmt.kind is Format.TSV else ",", url_column, caption_column, max_field)


def output_names(header: Sequence[str], score_columns: Sequence[str]) -> list[str]:
    """Input column names made unique against each other and the score columns (JSON keys and
    Parquet columns must not collide): a repeat becomes ``name_2``, ``name_3``..."""
    taken = set(score_columns)
    names: list[str] = []
    for name in header:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        names.append(candidate)
    return names
