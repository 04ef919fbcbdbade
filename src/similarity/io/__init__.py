"""Rows in and out of files: one reader and one writer interface over CSV, TSV, JSON Lines and
Parquet (``rows``, ``sinks``), the one CSV parser the reader and the job chunker share
(``csvfile``), text decoding with byte offsets (``text``), and byte streams over local files,
stdin/stdout and S3 (``streams``)."""

from .csvfile import OUTPUT_COLUMNS, CsvReader, CsvRows, CsvWriter, detect_layout, header_line
from .formats import FORMAT_NAMES, FileFormat, Format, format_of, parse_format
from .streams import default_output, is_s3, open_input, open_source, split_s3

__all__ = [
    "FORMAT_NAMES",
    "OUTPUT_COLUMNS",
    "CsvReader",
    "CsvRows",
    "CsvWriter",
    "FileFormat",
    "Format",
    "default_output",
    "detect_layout",
    "format_of",
    "header_line",
    "is_s3",
    "open_input",
    "open_source",
    "parse_format",
    "split_s3",
]
