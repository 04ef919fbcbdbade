"""Named error types. Each carries a short, stable ``code`` that ends up in the ``error`` column.

Row-level errors (``RowError`` subclasses) never stop a run: they are written as ``code: detail``
next to the row that caused them. ``JobError`` subclasses mean the whole input cannot be processed.
"""

from __future__ import annotations


class SimilarityError(Exception):
    """Base class of every error this library raises on purpose."""

    code = "error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


# --------------------------------------------------------------------------- row errors
class RowError(SimilarityError):
    """A problem with one row; the run goes on."""

    code = "row_error"


class MissingUrl(RowError):
    code = "missing_url"


class MissingCaption(RowError):
    code = "missing_caption"


class FieldTooLarge(RowError):
    code = "field_too_large"


class RaggedRow(RowError):
    code = "ragged_row"


class UnsupportedSource(RowError):
    """Scheme we do not fetch (ftp:, javascript:, ...) or a local path where local paths are off."""

    code = "unsupported_source"


class LocalPathsDisabled(RowError):
    code = "local_path_disabled"


class NotFound(RowError):
    """Local file or S3 object that does not exist."""

    code = "not_found"


class BlockedAddress(RowError):
    """The address guard refused the destination (private, loopback, metadata, ...)."""

    code = "blocked_address"


class FetchTimeout(RowError):
    code = "timeout"


class ConnectionFailed(RowError):
    code = "connection_error"


class HttpStatusError(RowError):
    """Non-2xx HTTP answer; the code carries the status, e.g. ``http_404``."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail)
        self.status = status

    @property
    def code(self) -> str:  # type: ignore[override]
        return f"http_{self.status}"


class TooManyRedirects(RowError):
    code = "too_many_redirects"


class TooLarge(RowError):
    """More bytes than the configured cap (declared or streamed, after decompression)."""

    code = "too_large"


class TooManyPixels(RowError):
    """Decompression-bomb guard: the header declares more pixels than allowed."""

    code = "too_many_pixels"


class NotAnImage(RowError):
    """The bytes are not one of the accepted image formats (sniffed, not trusted from headers)."""

    code = "not_an_image"


class DecodeError(RowError):
    """A recognised image format whose data Pillow could not decode (truncated, corrupt)."""

    code = "decode_error"


class S3Error(RowError):
    code = "s3_error"


class InvalidDataUri(RowError):
    code = "invalid_data_uri"


class InferenceError(RowError):
    """The model failed on this row's input; should not happen, reported rather than crashing."""

    code = "inference_error"


# --------------------------------------------------------------------------- job errors
class JobError(SimilarityError):
    """The input as a whole cannot be processed."""

    code = "job_error"


class ConfigError(JobError):
    """A setting or flag has a value we cannot use (bad CIDR, non-numeric timeout)."""

    code = "bad_config"


class InputNotFound(JobError):
    code = "input_not_found"


class NoUrlColumn(JobError):
    code = "no_url_column"


class NoCaptionColumn(JobError):
    code = "no_caption_column"


class MalformedCsv(JobError):
    code = "malformed_csv"


class ModelNotFound(JobError):
    code = "model_not_found"


class ModelIncomplete(JobError):
    code = "model_incomplete"


class ModelFetchFailed(JobError):
    code = "model_fetch_failed"


class BackendUnavailable(JobError):
    code = "backend_unavailable"


#: Codes a row's ``error`` column may carry (``http_<status>`` stands for every HTTP status).
ROW_ERROR_CODES: dict[str, str] = {
    "missing_url": "the row has no image URL",
    "missing_caption": "the row has no caption",
    "field_too_large": "a field is larger than the CSV field limit (default 128 KiB)",
    "ragged_row": "the row has more fields than the header; extra fields are kept after `error`",
    "unsupported_source": "not an http(s)://, s3://, data: URI or (CLI only) local path",
    "local_path_disabled": "local paths are turned off (services)",
    "not_found": "local file or S3 object does not exist",
    "blocked_address": "the host resolves to a loopback, private, link-local, metadata or other "
    "non-public address that is not allow-listed",
    "timeout": "connect/read timeout or the per-image deadline passed",
    "connection_error": "could not connect (refused, reset, DNS failure) after retries",
    "http_<status>": "the server answered with this HTTP status (after retries for 429/5xx)",
    "too_many_redirects": "more than 5 redirects",
    "too_large": "more bytes than the cap (Content-Length or streamed, after decompression)",
    "too_many_pixels": "the image declares more pixels than the decompression-bomb limit",
    "not_an_image": "the bytes are not JPEG, PNG, GIF, WebP, BMP or TIFF",
    "decode_error": "an image format that Pillow could not decode (truncated or corrupt)",
    "s3_error": "S3 refused the request (access denied, bad bucket)",
    "invalid_data_uri": "a data: URI that is not base64 image data",
    "inference_error": "the model failed on this input",
}


class InternalError(RowError):
    """A bug: an unexpected exception while handling this row, contained to the row."""

    code = "internal_error"


ROW_ERROR_CODES["internal_error"] = "an unexpected failure while handling this row (a bug: please report)"
