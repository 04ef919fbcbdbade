"""Streaming input and output: one CSV parser for the reader and the chunker, the writer, and
text streams over local files, stdin/stdout and S3."""

from .csvfile import OUTPUT_COLUMNS, CsvReader, CsvRows, CsvWriter, detect_layout, header_line
from .streams import default_output, is_s3, open_input, open_output, split_s3

__all__ = [
    "OUTPUT_COLUMNS",
    "CsvReader",
    "CsvRows",
    "CsvWriter",
    "default_output",
    "detect_layout",
    "header_line",
    "is_s3",
    "open_input",
    "open_output",
    "split_s3",
]
