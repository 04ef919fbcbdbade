"""Named error types. Each carries a short, stable ``code`` that ends up in the ``error`` column.

Row-level errors (``RowError`` subclasses) never stop a run: they are written as ``code: detail``
next to the row that caused them. ``RunError`` subclasses mean the whole input cannot be processed;
the CLI maps ``ModelError`` to exit 3 and every other ``RunError`` to exit 2.

``ROW_ERROR_CODES`` (the README's error table) is built from the classes' ``meaning``, so a code
and its explanation are written once.
"""

from __future__ import annotations

from typing import ClassVar


class SimilarityError(Exception):
    """Base class of every error this library raises on purpose."""

    code: str = "error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


# --------------------------------------------------------------------------- row errors
class RowError(SimilarityError):
    """A problem with one row; the run goes on."""

    code = "row_error"
    #: One line for the README's table; subclasses without it are not listed.
    meaning: ClassVar[str] = ""


class MissingUrl(RowError):
    code = "missing_url"
    meaning = "the row has no image URL"


class MissingCaption(RowError):
    code = "missing_caption"
    meaning = "the row has no caption"


class FieldTooLarge(RowError):
    code = "field_too_large"
    meaning = "a field is larger than the CSV field limit (default 128 KiB)"


class RaggedRow(RowError):
    code = "ragged_row"
    meaning = "the row has more fields than the header; extra fields are kept after `truncated`"


class UnsupportedSource(RowError):
    """Scheme we do not fetch (ftp:, javascript:, ...)."""

    code = "unsupported_source"
    meaning = "not an http(s)://, s3://, data: URI or (CLI only) local path, or a URL that cannot be parsed"


class LocalPathsDisabled(RowError):
    code = "local_path_disabled"
    meaning = "local paths are turned off (services)"


class NotFound(RowError):
    """Local file or S3 object that does not exist."""

    code = "not_found"
    meaning = "local file or S3 object does not exist"


class NotAFile(RowError):
    """A local path that names something other than a regular file, or a file whose size does not
    match what it holds (a /proc or /sys pseudo-file)."""

    code = "not_a_file"
    meaning = "a local path that is not a regular file (directory, device, FIFO, socket, /proc or /sys file)"


class BlockedAddress(RowError):
    """The address guard refused the destination (private, loopback, metadata, ...)."""

    code = "blocked_address"
    meaning = (
        "the host resolves to a loopback, private, link-local, metadata or other non-public address "
        "that is not allow-listed"
    )


class FetchTimeout(RowError):
    code = "timeout"
    meaning = "connect/read timeout or the per-image deadline passed"


class ConnectionFailed(RowError):
    code = "connection_error"
    meaning = "could not connect (refused, reset, DNS failure) after retries"


class HttpStatusError(RowError):
    """Non-2xx HTTP answer; the code carries the status, e.g. ``http_404``."""

    meaning = "the server answered with this HTTP status (after retries for 429/5xx)"
    table_code: ClassVar[str] = "http_<status>"

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.code = f"http_{status}"


class TooManyRedirects(RowError):
    code = "too_many_redirects"
    meaning = "more than 5 redirects"


class TooLarge(RowError):
    """More bytes than the configured cap (declared or streamed, after decompression)."""

    code = "too_large"
    meaning = "more bytes than the cap (Content-Length or streamed, after decompression)"


class TooManyPixels(RowError):
    """Decompression-bomb guard: the header declares more pixels than allowed."""

    code = "too_many_pixels"
    meaning = "the image declares more pixels than the decompression-bomb limit"


class NotAnImage(RowError):
    """The bytes are not one of the accepted image formats (sniffed, not trusted from headers)."""

    code = "not_an_image"
    meaning = "the bytes are not JPEG, PNG, GIF, WebP, BMP or TIFF"


class DecodeError(RowError):
    """A recognised image format whose data Pillow could not decode (truncated, corrupt)."""

    code = "decode_error"
    meaning = "an image format that Pillow could not decode (truncated or corrupt)"


class S3Error(RowError):
    code = "s3_error"
    meaning = "S3 refused the request (access denied, bad bucket)"


class InvalidDataUri(RowError):
    code = "invalid_data_uri"
    meaning = "a data: URI that is not base64 image data"


class InvalidCaption(RowError):
    """A caption that is not valid Unicode text (a lone surrogate, e.g. from a ``\\ud800`` escape in
    JSON or undecodable CSV bytes): no tokenizer can encode it."""

    code = "invalid_caption"
    meaning = "the caption is not valid Unicode text (it holds a lone surrogate)"


class InferenceError(RowError):
    """The model failed on this row's input; should not happen, reported rather than crashing."""

    code = "inference_error"
    meaning = "the model failed on this input"


class WorkerCrashed(RowError):
    """The worker process fetching and decoding this image died on it (``SIMILARITY_PROCESSES``)."""

    code = "worker_crashed"
    meaning = "the worker process fetching and decoding this image died on it (a decoder crash, the memory limit)"


class InternalError(RowError):
    """A bug: an unexpected exception while handling this row, contained to the row."""

    code = "internal_error"
    meaning = "an unexpected failure while handling this row (a bug: please report)"


# --------------------------------------------------------------------------- run errors
class RunError(SimilarityError):
    """The input as a whole cannot be processed."""

    code = "run_error"


class ConfigError(RunError):
    """A setting or flag has a value we cannot use (bad CIDR, non-numeric timeout)."""

    code = "bad_config"


class InputNotFound(RunError):
    code = "input_not_found"


class InputUnreadable(RunError):
    """The input exists (or may) but cannot be read: no credentials, access denied, a read that broke."""

    code = "input_unreadable"


class OutputUnwritable(RunError):
    """The output cannot be written there (no credentials, no bucket, no permission, a directory)."""

    code = "output_unwritable"


class NoUrlColumn(RunError):
    code = "no_url_column"


class NoCaptionColumn(RunError):
    code = "no_caption_column"


class MalformedInput(RunError):
    """The file cannot be read as rows of its format (the message names the line or byte)."""

    code = "malformed_input"


class MalformedCsv(MalformedInput):
    code = "malformed_csv"


class InputEncodingError(MalformedInput):
    """The bytes are not text in the expected encoding; the message gives the byte offset and the fix."""

    code = "bad_encoding"


class ResumeMismatch(RunError):
    """``--resume`` found a partial output of a different input, options or model."""

    code = "resume_mismatch"


class ModelError(RunError):
    """The model directory or the backend to run it cannot be used."""

    code = "model_error"


class ModelNotFound(ModelError):
    code = "model_not_found"


class ModelIncomplete(ModelError):
    code = "model_incomplete"


class ModelFetchFailed(ModelError):
    code = "model_fetch_failed"


class WorkersFailing(RunError):
    """The image worker processes keep dying with no image to blame (they cannot start)."""

    code = "workers_failing"


class BackendUnavailable(RunError):
    """The backend, device or dtype asked for cannot run here (not installed, no CUDA, no bf16)."""

    code = "backend_unavailable"


def _row_error_table() -> dict[str, str]:
    table: dict[str, str] = {}
    pending: list[type[RowError]] = [RowError]
    while pending:
        cls = pending.pop(0)
        if cls.meaning:
            table[cls.__dict__.get("table_code") or cls.code] = cls.meaning
        pending.extend(cls.__subclasses__())
    return table


#: Codes a row's ``error`` column may carry (``http_<status>`` stands for every HTTP status).
ROW_ERROR_CODES: dict[str, str] = _row_error_table()
