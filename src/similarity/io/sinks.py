"""One writer interface over every format. A sink writes the output's bytes to a binary file:

- CSV / TSV: the final bytes (header, rows); ``--excel-safe`` applies here only (spreadsheets).
- JSON Lines: one object per row: the input's keys, then ``similarity``, ``cosine`` (numbers or
  null), ``error`` (``"code: detail"`` or null), ``truncated`` (true/false), then any extra keys.
- Parquet: Arrow IPC messages (a stream that can be cut at any flushed batch and appended to,
  which the commit log of ``pipeline.commits`` needs); ``finish_parquet`` writes the Parquet file
  from them, in row groups of a fixed size, so the bytes do not depend on where a run was resumed.
  The input's columns keep their Parquet types; from CSV/TSV/JSON Lines they are strings.
  ``similarity`` and ``cosine`` are float64, ``error`` a string, ``truncated`` a bool.

Rows with more fields than the header (``ragged_row``) keep them after the score columns: CSV/TSV
as more cells, JSON Lines under their keys (``_extra`` for CSV fields), Parquet in an ``_extra``
column (JSON text; present when the input is a text format).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol

from ..types import ScoreResult
from .csvfile import OUTPUT_COLUMNS, excel_cell, header_cells, row_cells
from .formats import FileFormat, Format
from .rows import KeyedRow, as_text, output_names, require_pyarrow

EXTRA_COLUMN = "_extra"
#: Rows per Parquet row group (fixed, so a resumed run writes the same file as a clean one).
PARQUET_ROW_GROUP = 64 * 1024
_FLUSH_BYTES = 1 << 16
#: Encoding errors: a lone surrogate (a JSON ``\ud800`` escape) has no UTF-8 form. Its row already
#: says ``invalid_caption`` (or fails to fetch); its text is written with U+FFFD in that place.
_REPLACE = "similarity.replacement-character"


def _replacement(exc: UnicodeError) -> tuple[bytes, int]:
    if isinstance(exc, UnicodeEncodeError):  # bytes: UTF-8's encoder takes only ASCII text back
        return "\ufffd".encode() * (exc.end - exc.start), exc.end
    raise exc


codecs.register_error(_REPLACE, _replacement)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", _REPLACE)


def _valid_text(value: Any) -> Any:
    return _utf8(value).decode("utf-8") if isinstance(value, str) else value


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity (a JSON Lines input may, and Parquet floats): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RowSink(Protocol):
    def write(self, result: ScoreResult) -> None: ...

    def copy(self, values: Sequence[Any]) -> None:
        """Write a row of a previous output as it was (``--only-errors`` keeps those rows)."""

    def flush(self) -> None:
        """Hand everything written so far to the file object (then it may be fsync'd)."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        import base64

        return base64.b64encode(value).decode("ascii")
    return as_text(value)


def _extras(result_row: Sequence[Any], width: int) -> tuple[list[str], list[Any]]:
    extra = list(result_row[width:])
    keys = list(result_row.keys[width:]) if isinstance(result_row, KeyedRow) else []
    return keys, extra


class TextSink:
    """CSV or TSV bytes (UTF-8)."""

    def __init__(
        self, out: BinaryIO, header: Sequence[str], delimiter: str = ",", excel_safe: bool = False,
        write_header: bool = True,
    ) -> None:  # fmt: skip
        self._out = out
        self._buf = io.StringIO(newline="")
        self._writer = csv.writer(self._buf, delimiter=delimiter)
        self._width = len(header)
        self._excel_safe = excel_safe
        if write_header:
            self._writer.writerow(header_cells(header, excel_safe))

    def write(self, result: ScoreResult) -> None:
        self._writer.writerow(row_cells(result, self._width, self._excel_safe, as_text))
        if self._buf.tell() > _FLUSH_BYTES:
            self.flush()

    def copy(self, values: Sequence[Any]) -> None:
        cells = [as_text(v) for v in values]
        if self._excel_safe:  # the input's fields and a ragged row's extras; the four scores as they are
            scores = self._width + len(OUTPUT_COLUMNS)
            cells = [c if self._width <= i < scores else excel_cell(c) for i, c in enumerate(cells)]
        self._writer.writerow(cells)

    def flush(self) -> None:
        data = self._buf.getvalue()
        if data:
            self._out.write(_utf8(data))
            self._buf.seek(0)
            self._buf.truncate()


class JsonlSink:
    def __init__(self, out: BinaryIO, header: Sequence[str], write_header: bool = True) -> None:
        self._out = out
        self._names = output_names(header, OUTPUT_COLUMNS)
        self._width = len(header)
        self._buf: list[str] = []
        self._size = 0

    def _line(self, obj: dict[str, Any]) -> None:
        try:
            line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_json_default, allow_nan=False)
        except ValueError:  # a NaN or Infinity among the input's values
            line = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), default=_json_default)
        self._buf.append(line + "\n")
        self._size += len(line)
        if self._size > _FLUSH_BYTES:
            self.flush()

    def write(self, result: ScoreResult) -> None:
        row = list(result.record.row)
        obj: dict[str, Any] = dict(zip(self._names, row[: self._width], strict=False))
        for name in self._names[len(obj) :]:
            obj[name] = None
        obj.update(
            similarity=result.similarity,
            cosine=result.cosine_rounded,
            error=result.error_text or None,
            truncated=result.truncated,
        )
        keys, extra = _extras(result.record.row, self._width)
        if keys:
            for k, v in zip(keys, extra, strict=True):
                obj[k if k not in obj else f"{EXTRA_COLUMN}.{k}"] = v
        elif extra:
            obj[EXTRA_COLUMN] = extra
        self._line(obj)

    def copy(self, values: Sequence[Any]) -> None:
        keys = values.keys if isinstance(values, KeyedRow) else [*self._names, *OUTPUT_COLUMNS]
        self._line(dict(zip(keys, values, strict=False)))

    def flush(self) -> None:
        if self._buf:
            self._out.write(_utf8("".join(self._buf)))
            self._buf, self._size = [], 0


def _plain(field: Any) -> Any:
    """A dictionary-encoded column (pandas' ``Categorical``) as its values: the sink writes IPC
    batches without dictionary messages, and the values are what the rows hold."""
    pa = require_pyarrow("writing Parquet")
    return field.with_type(field.type.value_type) if pa.types.is_dictionary(field.type) else field


def output_schema(header: Sequence[str], source_schema: Any, text_source: bool) -> Any:
    """The Parquet output's schema: the input's fields (typed when the input is Parquet, strings
    otherwise), the score columns, and ``_extra`` for text inputs."""
    pa = require_pyarrow("writing Parquet")
    names = output_names(header, [*OUTPUT_COLUMNS, EXTRA_COLUMN])
    if source_schema is not None:
        fields = [_plain(source_schema.field(i)).with_name(n) for i, n in enumerate(names)]
    else:
        fields = [pa.field(n, pa.string()) for n in names]
    fields += [
        pa.field("similarity", pa.float64()),
        pa.field("cosine", pa.float64()),
        pa.field("error", pa.string()),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
    if text_source:
        fields.append(pa.field(EXTRA_COLUMN, pa.string()))
    return pa.schema(fields)


class ArrowSink:
    """Parquet rows as Arrow IPC messages (see the module's docstring); ``batch_rows`` per batch."""

    def __init__(
        self, out: BinaryIO, header: Sequence[str], schema: Any, text_source: bool, write_header: bool = True,
        batch_rows: int = 4096,
    ) -> None:  # fmt: skip
        self._pa = require_pyarrow("writing Parquet")
        self._out = out
        self._schema = schema
        self._width = len(header)
        self._text = text_source
        self._rows: list[list[Any]] = []
        self._batch_rows = batch_rows
        if write_header:
            out.write(schema.serialize().to_pybytes())

    def write(self, result: ScoreResult) -> None:
        row = list(result.record.row)
        base = row[: self._width] + [None] * (self._width - len(row))
        if self._text:
            base = [None if v is None else as_text(v) for v in base]
        values = [*base, result.similarity, result.cosine_rounded, result.error_text or None, result.truncated]
        if self._text:
            keys, extra = _extras(result.record.row, self._width)
            blob = dict(zip(keys, extra, strict=True)) if keys else extra
            values.append(json.dumps(blob, ensure_ascii=False, default=_json_default) if extra else None)
        self.copy(values)

    def copy(self, values: Sequence[Any]) -> None:
        self._rows.append(list(values))
        if len(self._rows) >= self._batch_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        pa = self._pa
        columns = list(zip(*self._rows, strict=True))
        arrays = [_array(pa, col, f.type) for col, f in zip(columns, self._schema, strict=True)]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        self._out.write(batch.serialize().to_pybytes())
        self._rows = []


def _array(pa: Any, values: Sequence[Any], type_: Any) -> Any:
    try:
        return pa.array(list(values), type=type_)
    except UnicodeEncodeError:  # a lone surrogate (see _REPLACE)
        if not pa.types.is_string(type_):
            raise
        return pa.array([_valid_text(v) for v in values], type=type_)


def finish_parquet(ipc: BinaryIO, out: BinaryIO, row_group: int = PARQUET_ROW_GROUP) -> int:
    """Write the Parquet file for the IPC stream in ``ipc``; returns the rows written."""
    pa = require_pyarrow("writing Parquet")
    pq = pa.parquet
    reader = pa.ipc.open_stream(ipc)
    rows = 0
    with pq.ParquetWriter(out, reader.schema, compression="zstd") as writer:
        pending: list[Any] = []
        held = 0
        for batch in reader:
            pending.append(batch)
            held += batch.num_rows
            while held >= row_group:
                table = pa.Table.from_batches(pending, schema=reader.schema)
                writer.write_table(table.slice(0, row_group), row_group_size=row_group)
                rest = table.slice(row_group)
                pending, held = rest.to_batches(), rest.num_rows
                rows += row_group
        if held or rows == 0:
            writer.write_table(pa.Table.from_batches(pending, schema=reader.schema), row_group_size=row_group)
            rows += held
    return rows


def make_sink(
    fmt: FileFormat, out: BinaryIO, header: Sequence[str], *, source_schema: Any = None, text_source: bool = True,
    excel_safe: bool = False, write_header: bool = True,
) -> RowSink:  # fmt: skip
    if fmt.kind is Format.PARQUET:
        schema = output_schema(header, source_schema, text_source)
        return ArrowSink(out, header, schema, text_source, write_header)
    if fmt.kind is Format.JSONL:
        return JsonlSink(out, header, write_header)
    return TextSink(out, header, "\t" if fmt.kind is Format.TSV else ",", excel_safe, write_header)
