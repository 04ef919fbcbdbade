"""File formats: CSV, TSV, JSON Lines and Parquet, plain or gzip-compressed (not Parquet, which
compresses inside). Chosen by a name (``--input-format`` / ``--output-format``) or by the path's
extension; anything unrecognised is CSV, as it always was."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum

from ..errors import ConfigError


class Format(StrEnum):
    CSV = "csv"
    TSV = "tsv"
    JSONL = "jsonl"
    PARQUET = "parquet"


_EXTENSIONS: dict[str, Format] = {
    ".csv": Format.CSV,
    ".tsv": Format.TSV,
    ".tab": Format.TSV,
    ".jsonl": Format.JSONL,
    ".ndjson": Format.JSONL,
    ".parquet": Format.PARQUET,
    ".pq": Format.PARQUET,
}
_GZIP = (".gz", ".gzip")


@dataclass(frozen=True)
class FileFormat:
    kind: Format = Format.CSV
    gzip: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}.gz" if self.gzip else str(self.kind)

    @property
    def text(self) -> bool:
        return self.kind is not Format.PARQUET

    @property
    def extension(self) -> str:
        return f".{self.name}"


CSV = FileFormat()
#: What ``--input-format`` / ``--output-format`` accept.
FORMAT_NAMES = tuple(FileFormat(k, g).name for k in Format for g in (False, True) if not (g and k is Format.PARQUET))


def parse_format(name: str, flag: str = "--format") -> FileFormat:
    value = name.strip().lower().lstrip(".")
    for candidate in FORMAT_NAMES:
        if value == candidate:
            kind, _, gz = candidate.partition(".")
            return FileFormat(Format(kind), bool(gz))
    raise ConfigError(f"{flag}: unknown format {name!r} (one of {', '.join(FORMAT_NAMES)})")


def split_extension(uri: str) -> tuple[str, FileFormat | None]:
    """(the path without its extensions, the format they name or None). ``x.gz`` alone is CSV."""
    base, ext = os.path.splitext(uri)
    gz = ext.lower() in _GZIP
    stem, inner = os.path.splitext(base) if gz else (base, ext)
    kind = _EXTENSIONS.get(inner.lower())
    if kind is None:
        return (base if gz and not inner else stem), (FileFormat(Format.CSV, True) if gz else None)
    return stem, FileFormat(kind, gz and kind is not Format.PARQUET)


def format_of(uri: str, explicit: str | None = None, flag: str = "--format") -> FileFormat:
    """The named format, else the one the extension says, else CSV (stdin and ``.txt`` included)."""
    if explicit:
        return parse_format(explicit, flag)
    if uri == "-":
        return CSV
    return split_extension(uri)[1] or CSV


def output_format_of(uri: str, explicit: str | None, input_format: FileFormat) -> FileFormat:
    """The output's format: the named one, else the extension's, else the input's kind (``-`` and
    unrecognised names; not compressed, whatever the input was)."""
    if explicit:
        return parse_format(explicit, "--output-format")
    named = split_extension(uri)[1] if uri != "-" else None
    return named or FileFormat(input_format.kind, False)


def scored_name(input_uri: str, fmt: FileFormat) -> str:
    """``data.csv`` -> ``data_scored.csv``; ``data.jsonl.gz`` -> ``data_scored.jsonl.gz``."""
    name = os.path.basename(input_uri.rstrip("/")) or "input"
    stem = split_extension(name)[0] or name
    return f"{stem}_scored{fmt.extension}"
