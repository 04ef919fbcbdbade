"""Score whole files: stream rows in, score them, stream rows out, in any format, with commits a
crashed run resumes from. The CLI and the GPU task call ``score_file`` (``score_csv`` is the same
function under its older name); the chunk workers call ``score_stream`` on CSV text, so every path
writes the same bytes for the same input."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, TextIO, cast

from ..cache import EmbeddingCache
from ..errors import ConfigError, OutputUnwritable, ResumeMismatch, RunError
from ..fetch import Fetcher
from ..io.csvfile import DEFAULT_MAX_FIELD, OUTPUT_COLUMNS, CsvReader, CsvWriter, detect_layout, excel_value
from ..io.formats import FileFormat, Format, format_of, output_format_of
from ..io.rows import RowReader, open_reader
from ..io.sinks import EXTRA_COLUMN, RowSink, finish_parquet, make_sink
from ..io.streams import Source, is_s3, is_stream, open_source, s3_reason, split_s3
from ..model import ClipModel
from ..model.preprocess import PREPROCESS_VERSION
from ..types import Record, ScoreResult, ScoreStats
from .commits import PARTIAL_SUFFIX, Commit, Committer, Partial, stats_of
from .scorer import Scorer

#: What a run does when the output already has a partial directory from an earlier run.
OnPartial = Literal["fail", "restart", "resume"]


@dataclass
class FileResult:
    stats: ScoreStats
    seconds: float
    header: list[str] = field(default_factory=list)
    #: Rows taken from the committed part of an earlier run (``--resume``), not scored again.
    resumed_rows: int = 0
    #: Rows copied from the previous output as they were (``--only-errors``).
    kept_rows: int = 0
    #: Where the output was kept locally when its upload failed (raised as ``OutputUnwritable``).
    output: str = ""

    @property
    def pairs_per_second(self) -> float:
        done = self.stats.rows - self.resumed_rows - self.kept_rows
        return done / self.seconds if self.seconds > 0 else 0.0


class Progress(Protocol):
    def start(self, total: int | None, unit: str, rows: int) -> None: ...

    def update(self, done: int, rows: int) -> None: ...


@dataclass(frozen=True)
class ErrorFilter:
    """Error codes to score again (``--only-errors``): exact codes, or ``http_4xx`` / ``http_5xx``."""

    codes: frozenset[str]

    @classmethod
    def parse(cls, text: str, flag: str = "--only-errors") -> ErrorFilter:
        from ..errors import ROW_ERROR_CODES

        codes = frozenset(c.strip() for c in text.split(",") if c.strip())
        known = set(ROW_ERROR_CODES) - {"http_<status>"}
        bad = [
            c
            for c in codes
            if c not in known
            and not (
                c.startswith("http_") and len(c) == 8 and c[5].isdigit() and (c[6:].isdigit() or c[6:] == "xx")
            )  # fmt: skip
        ]
        if not codes or bad:
            raise ConfigError(
                f"{flag}: unknown error code(s) {', '.join(sorted(bad)) or repr(text)}; use codes from the README's "
                "table, "
                "comma-separated, e.g. timeout,connection_error,http_5xx"
            )
        return cls(codes)

    def matches(self, error_text: Any) -> bool:
        if not isinstance(error_text, str) or not error_text:
            return False
        code = error_text.split(":", 1)[0].strip()
        return code in self.codes or (code.startswith("http_") and f"{code[:6]}xx" in self.codes)


def score_stream(
    src: Iterable[str],
    dst: TextIO,
    model: ClipModel,
    fetcher: Fetcher,
    *,
    batch_size: int = 32,
    workers: int = 16,
    url_column: str | None = None,
    caption_column: str | None = None,
    max_field: int = DEFAULT_MAX_FIELD,
    excel_safe: bool = False,
    write_header: bool = True,
    on_row: Callable[[int], None] | None = None,
    cache: EmbeddingCache | None = None,
    processes: int = 0,
) -> FileResult:
    """CSV text in, CSV text out (the batch pipeline's chunks). ``processes``: see ``Scorer``."""
    start = time.perf_counter()
    reader = CsvReader(src, url_column=url_column, caption_column=caption_column, max_field=max_field)
    writer = CsvWriter(dst, reader.header, excel_safe=excel_safe, write_header=write_header)
    scorer = Scorer(model, fetcher, batch_size=batch_size, workers=workers, cache=cache, processes=processes)
    for result in scorer.score(reader):
        writer.write(result)
        if on_row is not None:
            on_row(1)
    return FileResult(scorer.stats, time.perf_counter() - start, reader.header)


# ---------------------------------------------------------------------------------------- files
def partial_dir(output_uri: str) -> Path:
    """Where a run keeps the output until it completes: ``OUTPUT.partial/`` beside a local output;
    for ``s3://`` outputs, ``.similarity-partial/<hash>-<name>/`` in the working directory."""
    if is_s3(output_uri):
        digest = hashlib.sha256(output_uri.encode()).hexdigest()[:12]
        return Path(".similarity-partial") / f"{digest}-{output_uri.rsplit('/', 1)[-1]}"
    path = Path(output_uri)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def check_output_writable(output_uri: str, s3_client: Any = None) -> None:
    """Before any row is scored: an S3 output's bucket exists and takes writes (a multipart upload
    is started and aborted: nothing is written), a local output's folder can be created."""
    if output_uri == "-":
        return
    if is_s3(output_uri):
        bucket, key = split_s3(output_uri)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            upload = s3_client.create_multipart_upload(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise OutputUnwritable(f"cannot write {output_uri}: {s3_reason(exc)}") from None
        with contextlib.suppress(BotoCoreError, ClientError):
            s3_client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        return
    path = Path(output_uri)
    if path.is_dir():
        raise OutputUnwritable(f"output {output_uri!r} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputUnwritable(f"cannot create the output's folder {str(path.parent)!r}: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputUnwritable(f"cannot write in {str(path.parent)!r}: permission denied")


def _identity(
    source: Source, fmt_in: FileFormat, fmt_out: FileFormat, model: ClipModel, options: dict[str, Any]
) -> dict[str, Any]:
    info = model.info
    where = source.uri if is_s3(source.uri) else str(Path(source.uri).resolve())
    return {
        "input": where,
        "input_identity": source.identity,
        "input_format": fmt_in.name,
        "output_format": fmt_out.name,
        "options": options,
        "model": {"id": info.model_id, "revision": info.revision, "backend": info.backend, "dtype": info.dtype},
        # How pixels are made (--jpeg-draft among it): rows scored otherwise must not be mixed in.
        # The pixel limit only decides too_many_pixels and follows the machine's memory: left out.
        "preprocess": {
            "version": PREPROCESS_VERSION,
            **{k: v for k, v in asdict(model.preprocess).items() if k != "max_pixels"},
        },
    }


@dataclass
class _Rescore:
    """``--only-errors``: which rows of a previous output are scored again."""

    only: ErrorFilter
    width: int  # the previous output's columns before its scores: the input's columns
    extra_column: bool  # a Parquet output of a text input: ``_extra`` after the scores
    #: The previous output is ``--excel-safe`` too: a URL or caption is scored as it was before
    #: its ``'`` (the row is written as it is, still escaped).
    excel_safe: bool = False

    @property
    def error_index(self) -> int:
        return self.width + 2

    def wanted(self, row: Sequence[Any]) -> bool:
        # Ragged rows (fields after the scores) come out ragged again: they are kept as they were.
        full = self.width + len(OUTPUT_COLUMNS) + int(self.extra_column)
        extra_empty = not self.extra_column or len(row) < full or row[full - 1] in (None, "")
        return len(row) == full and extra_empty and self.only.matches(row[self.error_index])


def _rows(reader: RowReader, skip: int) -> Iterator[Record]:
    # Rows committed by the run being resumed are read past, never fetched again.
    yield from itertools.islice(reader, skip, None)


def _rescore_layout(reader: RowReader, url_column: str | None, caption_column: str | None) -> tuple[int, list[str]]:
    """(number of input columns, their names) of a previous output: the columns before its scores."""
    header = reader.header
    for w in range(len(header) - len(OUTPUT_COLUMNS), -1, -1):
        if tuple(header[w : w + len(OUTPUT_COLUMNS)]) == OUTPUT_COLUMNS:
            base = header[:w]
            layout = detect_layout(base, url_column, caption_column)  # raises when base lacks them
            if (layout.url_index, layout.caption_index) != (reader.layout.url_index, reader.layout.caption_index):
                raise ConfigError(
                    f"--only-errors: the previous output's URL and caption columns are ambiguous in {base!r}"
                )
            return w, base
    raise ConfigError(
        f"--only-errors reads a previous output, which ends with the columns {', '.join(OUTPUT_COLUMNS)}; "
        f"{reader.header!r} does not"
    )


def score_file(
    input_uri: str,
    output_uri: str,
    model: ClipModel,
    fetcher: Fetcher,
    s3_client: Any = None,
    *,
    batch_size: int = 32,
    workers: int = 16,
    url_column: str | None = None,
    caption_column: str | None = None,
    input_format: str | FileFormat | None = None,
    output_format: str | FileFormat | None = None,
    encoding: str | None = None,
    max_field: int = DEFAULT_MAX_FIELD,
    excel_safe: bool = False,
    only_errors: ErrorFilter | None = None,
    on_partial: OnPartial = "restart",
    commit_rows: int = 1000,
    commit_seconds: float = 5.0,
    on_row: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    cache: EmbeddingCache | None = None,
    processes: int = 0,
) -> FileResult:
    """Score ``input_uri`` into ``output_uri`` (local paths, ``-``, ``s3://``; format by name or
    extension); ``processes``: see ``Scorer``. The output appears only when complete; until then rows are committed to
    ``partial_dir(output_uri)`` (``-``: streamed, no commits). ``on_partial``: what to do with an
    earlier run's partial output: continue it (``resume``), discard it (``restart``), or raise
    ``ResumeMismatch`` (``fail``, the CLI without ``--resume``/``--restart``)."""
    start = time.perf_counter()
    fmt_in = (
        input_format if isinstance(input_format, FileFormat) else format_of(input_uri, input_format, "--input-format")
    )
    if only_errors is not None and output_format is None:
        fmt_out = fmt_in  # a rescored file keeps the previous output's layout
    else:
        fmt_out = output_format if isinstance(output_format, FileFormat) else output_format_of(output_uri, output_format, fmt_in)  # fmt: skip
    if only_errors is not None and fmt_out != fmt_in:
        raise ConfigError("--only-errors writes the previous output's format: drop --output-format or match it")
    stream_out = output_uri == "-"
    partial = Partial(partial_dir(output_uri)) if not stream_out else None
    resumable = partial is not None and partial.resumable()
    resuming = resumable and on_partial == "resume"
    if resuming and is_stream(input_uri):
        what = "stdin" if input_uri == "-" else f"{input_uri} (a pipe, not a file)"
        raise ResumeMismatch(
            f"{what} cannot be resumed (nothing shows it is the same input): score a file, or --restart"
        )
    if partial is not None and resumable and on_partial == "fail":
        done = partial.last_commit().rows
        raise ResumeMismatch(
            f"an earlier run to {output_uri} stopped after {done} committed rows (kept in {partial.dir}): "
            "add --resume to continue it, or --restart to start over"
        )
    with open_source(input_uri, s3_client, gunzip=fmt_in.gzip, identify=not stream_out) as source:
        options = {
            "url_column": url_column,
            "caption_column": caption_column,
            "encoding": encoding,
            "excel_safe": excel_safe,
            "max_field": max_field,
            "only_errors": sorted(only_errors.codes) if only_errors else None,
            "batch_size": batch_size,  # which rows share a batch (see _Run.align)
        }
        identity = _identity(source, fmt_in, fmt_out, model, options)
        commit = Commit()
        if resuming:
            assert partial is not None
            partial.check(identity)
            commit = partial.last_commit()
        reader = open_reader(
            source,
            fmt_in,
            url_column=url_column,
            caption_column=caption_column,
            encoding=encoding,
            max_field=max_field,
            fixed_columns=fmt_out.kind is not Format.JSONL,
        )
        header = reader.header
        width = len(header)
        if only_errors is not None:
            width, header = _rescore_layout(reader, url_column, caption_column)
        rescore = None
        text_source = fmt_in.kind is not Format.PARQUET
        schema = reader.schema
        if only_errors is not None:
            extra = EXTRA_COLUMN in reader.header[width + len(OUTPUT_COLUMNS) :]
            rescore = _Rescore(only_errors, width, extra, excel_safe and fmt_out.kind in (Format.CSV, Format.TSV))
            if schema is not None:
                schema = _head(schema, width)
                text_source = extra
        with _output(partial, fmt_out, output_uri, resuming, commit, identity, s3_client, commit_rows,
                     commit_seconds) as out:  # fmt: skip
            sink = make_sink(
                fmt_out, out.stream, header, source_schema=schema, text_source=text_source, excel_safe=excel_safe,
                write_header=not resuming,
            )  # fmt: skip
            totals = stats_of(commit.stats) if resuming else ScoreStats()
            run = _Run(out, sink, totals, commit.rows, on_row, progress, source, reader)
            if out.committer is not None and not resuming:
                run.commit()  # the header is on disk: resumable from the first row
            if progress is not None:
                total, unit = _progress_total(source, reader)
                progress.start(total, unit, commit.rows)
            scorer = Scorer(model, fetcher, batch_size=batch_size, workers=workers, cache=cache, processes=processes)
            run.scorer = scorer.stats
            run.align = scorer.window if rescore is None else 1  # --only-errors: windows of rescored rows only
            try:
                if rescore is None:
                    for result in scorer.score(_rows(reader, commit.rows)):
                        run.write(result)
                else:
                    run.rescore(scorer, _rows(reader, commit.rows), rescore)
            except KeyboardInterrupt:
                if out.committer is not None and run.at_boundary() and not run.busy:
                    run.commit()  # what was written before Ctrl-C is kept for --resume
                raise
            _merge_counts(totals, scorer.stats)
            if out.committer is not None:
                run.commit(merge=False)
            else:
                sink.flush()
        final = out.finished
    return FileResult(totals, time.perf_counter() - start, header, commit.rows, run.kept, final)


score_csv = score_file


#: Rows of a previous output looked at per pass of ``--only-errors`` (bounds what is held in memory).
RESCORE_SEGMENT = 4096


@dataclass
class _Run:
    out: _Out
    sink: RowSink
    totals: ScoreStats
    rows: int
    on_row: Callable[[int], None] | None
    progress: Progress | None
    source: Source
    reader: RowReader
    scorer: ScoreStats | None = None
    kept: int = 0
    #: Commits fall on multiples of this many rows (the scorer's window), so a resumed run's windows,
    #: and with them its batches, are the clean run's.
    align: int = 1
    #: True while a row is half written (in the sink, not yet counted) or a commit is under way: a
    #: Ctrl-C then must not commit, or the commit would name more bytes than rows.
    busy: bool = False

    def at_boundary(self) -> bool:
        return self.rows % self.align == 0

    def _snapshot(self) -> ScoreStats:
        snap = ScoreStats(**{**asdict(self.totals), "errors": dict(self.totals.errors)})
        if self.scorer is not None:
            _merge_counts(snap, self.scorer)
        return snap

    def commit(self, merge: bool = True) -> None:
        assert self.out.committer is not None
        self.out.committer.now(self.rows, self.sink.flush, self._snapshot if merge else lambda: self.totals)

    def _tick(self) -> None:
        self.rows += 1
        if self.out.committer is not None:
            if self.at_boundary():
                self.out.committer.maybe(self.rows, self.sink.flush, self._snapshot)
        elif self.out.line_flush:
            self.sink.flush()  # stdout: each row reaches the reader (``| head``) as it is scored
        if self.on_row is not None:
            self.on_row(1)
        if self.progress is not None:
            rows_read = getattr(self.reader, "rows_read", None)
            self.progress.update(int(rows_read) if rows_read is not None else self.source.bytes_read, self.rows)

    def write(self, result: ScoreResult) -> None:
        self.busy = True
        self.sink.write(result)
        self.totals.add(result)
        self._tick()
        self.busy = False

    def keep(self, row: Sequence[Any], error_index: int) -> None:
        self.busy = True
        self.sink.copy(row)
        _count_copy(self.totals, row, error_index)
        self.kept += 1
        self._tick()
        self.busy = False

    def rescore(self, scorer: Scorer, records: Iterator[Record], rescore: _Rescore) -> None:
        while segment := list(itertools.islice(records, RESCORE_SEGMENT)):
            wanted = [rescore.wanted(rec.row) for rec in segment]
            unescape = excel_value if rescore.excel_safe else _same
            todo = [
                Record(unescape(r.url), unescape(r.caption), row=list(r.row[: rescore.width]))
                for r, w in zip(segment, wanted, strict=True)
                if w
            ]
            results = scorer.score(todo)
            for rec, w in zip(segment, wanted, strict=True):
                if w:
                    self.write(next(results))
                else:
                    self.keep(rec.row, rescore.error_index)
            if isinstance(results, Generator):
                results.close()  # every record had its result; this shuts the fetch pool down


def _same(value: Any) -> Any:
    return value


def _head(schema: Any, width: int) -> Any:
    import pyarrow as pa

    return pa.schema([schema.field(i) for i in range(width)])


def _count_copy(totals: ScoreStats, row: Sequence[Any], error_index: int) -> None:
    totals.rows += 1
    error = row[error_index] if len(row) > error_index else None
    if isinstance(error, str) and error:
        code = error.split(":", 1)[0].strip()
        totals.errors[code] = totals.errors.get(code, 0) + 1
    else:
        totals.scored += 1
    truncated = row[error_index + 1] if len(row) > error_index + 1 else None
    totals.truncated += int(truncated is True or truncated == "true")


def _merge_counts(totals: ScoreStats, scorer: ScoreStats) -> None:
    totals.images_fetched += scorer.images_fetched
    totals.images_embedded += scorer.images_embedded
    totals.captions_encoded += scorer.captions_encoded
    for name, n in scorer.cache.items():
        totals.cache[name] = totals.cache.get(name, 0) + n


def _progress_total(source: Source, reader: RowReader) -> tuple[int | None, str]:
    rows_total = getattr(reader, "rows_total", None)
    if rows_total is not None:
        return int(rows_total), "rows"
    return source.size, "bytes"


@dataclass
class _Out:
    stream: BinaryIO
    committer: Committer | None
    finished: str = ""
    line_flush: bool = False


@contextlib.contextmanager
def _output(
    partial: Partial | None, fmt: FileFormat, output_uri: str, resuming: bool, commit: Commit,
    identity: dict[str, Any], s3_client: Any, commit_rows: int, commit_seconds: float,
) -> Iterator[_Out]:  # fmt: skip
    """The binary stream the sink writes to, and on success the output put in place."""
    if partial is None:  # stdout: text formats stream; gzip is compressed as it goes; Parquet at the end
        yield from _stdout(fmt)
        return
    stream = partial.reopen(commit) if resuming else partial.start(identity)
    out = _Out(stream, Committer(partial, commit_rows, commit_seconds))
    try:
        yield out
    except RunError:
        partial.discard()  # the input itself is bad: nothing worth resuming
        raise
    finally:
        partial.close()
    out.finished = _finish(partial, fmt, output_uri, s3_client)


def _stdout(fmt: FileFormat) -> Iterator[_Out]:
    buffer = sys.stdout.buffer
    if fmt.kind is Format.PARQUET:
        import tempfile

        with tempfile.TemporaryFile() as tmp:
            out = _Out(tmp, None)
            yield out
            tmp.seek(0)
            finish_parquet(tmp, buffer)
            buffer.flush()
        return
    if fmt.gzip:
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gz:
            yield _Out(gz, None)  # type: ignore[arg-type]
        buffer.flush()
        return
    yield _Out(cast(BinaryIO, _Flushing(buffer)), None, line_flush=True)
    buffer.flush()


class _Flushing:
    """stdout that reaches the reader after each flushed block (``| head`` sees rows as they come)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def write(self, data: bytes) -> int:
        n = self._raw.write(data)
        self._raw.flush()
        return n

    def tell(self) -> int:
        return 0


def _finish(partial: Partial, fmt: FileFormat, output_uri: str, s3_client: Any) -> str:
    """Render the committed rows as the output and put it in place; returns where it is."""
    data = partial.data_path
    if fmt.kind is Format.PARQUET or fmt.gzip:
        final = partial.dir / ("final" + fmt.extension)
        with data.open("rb") as src, final.open("wb") as dst:
            if fmt.kind is Format.PARQUET:
                finish_parquet(src, dst)
            else:
                with gzip.GzipFile(fileobj=dst, mode="wb", mtime=0, filename="") as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    else:
        final = data
    if is_s3(output_uri):
        return _upload(partial, final, fmt, output_uri, s3_client)
    os.replace(final, output_uri)
    partial.discard()
    return output_uri


_CONTENT_TYPES = {
    Format.CSV: "text/csv; charset=utf-8",
    Format.TSV: "text/tab-separated-values; charset=utf-8",
    Format.JSONL: "application/x-ndjson; charset=utf-8",
    Format.PARQUET: "application/vnd.apache.parquet",
}


def _upload(partial: Partial, final: Path, fmt: FileFormat, output_uri: str, s3_client: Any) -> str:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(output_uri)
    extra = {"ContentType": _CONTENT_TYPES[fmt.kind]}
    if fmt.gzip:
        extra["ContentEncoding"] = "gzip"
    try:
        s3_client.upload_file(str(final), bucket, key, ExtraArgs=extra)
    except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
        name = key.rsplit("/", 1)[-1] or "output"
        kept = Path(name)
        if kept.exists():
            kept = Path(f"{partial.dir.name.split('-', 1)[0]}-{name}")
        os.replace(final, kept)
        partial.discard()
        raise OutputUnwritable(
            f"the upload to {output_uri} failed ({s3_reason(exc)}); the scored output is kept at {kept.resolve()}"
        ) from None
    partial.discard()
    return output_uri
