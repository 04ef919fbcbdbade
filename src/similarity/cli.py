"""``similarity`` command line: ``score`` a file, ``model fetch|info|export``, ``cache stats|clear``,
``serve`` the HTTP API.

Subcommands are entries of ``COMMANDS`` (a name, the function that adds its arguments, the
function that runs it), so a new one is one function pair and one line.

Exit status (``EXIT_*``; the README's CLI section lists the same): 0 the file was processed (row
errors included), 2 the input or a flag cannot be used (missing file, no URL column, malformed
file, bad encoding, unwritable output, a bad flag or variable: the message names it), 3 the model
is missing, incomplete or cannot be loaded, 4 every row failed (or, with ``--fail-on-errors``,
any row did), 130 interrupted (committed rows are kept for ``--resume``), 141 the reader of
``-o -`` went away (as for a process killed by SIGPIPE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .cache import cli as cache_cli
from .config import LogSettings, Settings, load, validated
from .errors import (
    BackendUnavailable,
    ConfigError,
    InputNotFound,
    ModelError,
    ModelFetchFailed,
    ModelIncomplete,
    OutputUnwritable,
    RunError,
)
from .model.directory import DEFAULT_MODEL_ID

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_MODEL = 3
EXIT_ROWS_FAILED = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

#: Settings fields the CLI's flags set, by section, with the flag's name for messages.
FLAGS: dict[str, dict[str, str]] = {
    "model": {
        "dir": "--model",
        "backend": "--backend",
        "device": "--device",
        "dtype": "--dtype",
        "threads": "--threads",
        "streams": "--streams",
        "jpeg_draft": "--jpeg-draft",
        "pixels": "--pixels",
    },
    "fetch": {
        "deadline": "--timeout",
        "max_image_bytes": "--max-image-bytes",
        "allow_local_paths": "--no-local-paths",
        "allowed_networks": "--allow-network",
    },
    "score": {
        "batch_size": "--batch-size",
        "workers": "--workers",
        "processes": "--processes",
        "excel_safe": "--excel-safe",
        "commit_rows": "--commit-rows",
    },
}


# ------------------------------------------------------------------------------------ score
def _add_score(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .io.formats import FORMAT_NAMES

    s = sub.add_parser("score", help="score a file of (image, caption) rows")
    s.add_argument("input", help="CSV/TSV/JSONL/Parquet path (.gz for gzip), s3://bucket/key, or - for stdin")
    s.add_argument(
        "-o",
        "--output",
        help="output path, folder (ending in /) or s3:// URI (default: INPUT_scored.EXT beside the input; - for stdout)",
    )
    s.add_argument("--input-format", choices=FORMAT_NAMES, help="default: from the extension (CSV otherwise)")
    s.add_argument("--output-format", choices=FORMAT_NAMES, help="default: from the extension, else the input's")
    s.add_argument("--encoding", help="text encoding of a CSV/TSV/JSONL input, e.g. cp1252 (default: UTF-8)")
    s.add_argument("--model", help="model directory (default: $CLIP_MODEL_DIR or models/clip-vit-base-patch32)")
    s.add_argument("--backend", choices=["auto", "torch", "onnx", "openvino"], help="inference backend (default auto)")
    s.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="precision (default auto: the fastest within 0.002 of fp32 on this machine)",
    )
    s.add_argument("--batch-size", type=int, help="images/captions per model call (default 32)")
    s.add_argument("--workers", type=int, help="concurrent image downloads (default 16)")
    s.add_argument(
        "--processes",
        type=int,
        help="fetch and decode in this many worker processes, the downloads spread over them "
        "(default 0: threads of this process; for many cores beside a GPU)",
    )
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: cuda when available")
    s.add_argument("--threads", type=int, help="CPU threads for inference (default: all cores)")
    s.add_argument(
        "--streams", type=int, help="batch parts run at once, each on threads/streams threads (default: one per thread)"
    )
    s.add_argument(
        "--jpeg-draft",
        type=int,
        metavar="FACTOR",
        help="opt-in: decode large JPEGs at reduced scale while their short side stays FACTOR times the "
        "model's input (faster; moves scores by up to 0.023 at 2, 0.007 at 3-4; default 0: off)",
    )
    s.add_argument(
        "--pixels",
        choices=["pillow", "torch", "nvjpeg"],
        help="where images become model input: pillow on the CPU (default); torch: resized on the model's "
        "device, the same values to the bit; nvjpeg: JPEGs decoded on the GPU too (other pixels)",
    )
    s.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="let the address guard admit this network (repeatable); adds to $SIMILARITY_ALLOWED_NETWORKS",
    )
    s.add_argument("--no-local-paths", action="store_true", help="refuse local paths and file:// URLs")
    s.add_argument("--url-column", help="name of the image URL column (default: url, image_url or image)")
    s.add_argument("--caption-column", help="name of the caption column (default: caption or text)")
    s.add_argument("--timeout", type=float, help="total seconds per image, retries included (default 30)")
    s.add_argument("--max-image-bytes", type=int, help="byte cap per image (default 20 MiB)")
    s.add_argument("--excel-safe", action="store_true", help="CSV/TSV: prefix cells starting with = + - @ with '")
    again = s.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run from its committed rows")
    again.add_argument("--restart", action="store_true", help="discard an interrupted run's committed rows")
    s.add_argument(
        "--commit-rows",
        type=int,
        help="commit the output every N rows (default 1000; also every 5 s), at the next window boundary",
    )
    s.add_argument(
        "--only-errors",
        metavar="CODES",
        help="INPUT is a previous output: score again only its rows with these error codes "
        "(comma-separated, e.g. timeout,connection_error,http_5xx), keep the others as they are",
    )
    s.add_argument("--fail-on-errors", action="store_true", help="exit 4 when any row has an error")
    bar = s.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is no terminal")
    bar.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    s.add_argument("--summary-json", metavar="PATH", help="also write the run summary as JSON to this path")
    cache_cli.add_score_flags(s)


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment's settings with the flags laid over them (each validated, named in errors)."""
    settings = load(Settings)
    settings = settings.with_overrides(
        "model",
        {
            "dir": args.model,
            "backend": args.backend,
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "streams": args.streams,
            "jpeg_draft": args.jpeg_draft,
            "pixels": args.pixels,
        },
        FLAGS["model"],
    )
    networks = settings.fetch.allowed_networks + tuple(args.allow_network)
    settings = settings.with_overrides(
        "fetch",
        {
            "deadline": args.timeout,
            "max_image_bytes": args.max_image_bytes,
            "allow_local_paths": False if args.no_local_paths else None,
            "allowed_networks": networks if args.allow_network else None,
        },
        FLAGS["fetch"],
    )
    settings = settings.with_overrides(
        "score",
        {
            "batch_size": args.batch_size,
            "workers": args.workers,
            "processes": args.processes,
            "excel_safe": True if args.excel_safe else None,
            "commit_rows": args.commit_rows,
        },
        FLAGS["score"],
    )
    return cache_cli.apply_flags(settings, args)


def resolve_output(
    input_uri: str, output: str | None, output_format: str | None, input_format: str | None = None
) -> str:
    """The output URI: the default beside the input, or ``<folder>/<input>_scored.<ext>`` when
    ``output`` names a folder (ends with ``/`` or is an existing directory); the name's format is
    ``output_format``, else the input's."""
    from .io.formats import CSV, format_of, parse_format, scored_name
    from .io.streams import default_output, is_s3

    if output_format:
        fmt = parse_format(output_format, "--output-format")
    elif input_format or input_uri != "-":
        fmt = format_of(input_uri, input_format, "--input-format")
    else:
        fmt = None
    if output is None:
        return default_output(input_uri, fmt)
    if output == "-":
        return output
    folder = output.endswith(("/", os.sep)) or (not is_s3(output) and Path(output).is_dir())
    if not folder:
        return output
    name = scored_name(input_uri if input_uri != "-" else "stdin", fmt or CSV)
    return output.rstrip("/") + "/" + name if is_s3(output) else str(Path(output) / name)


def _same_file(a: str, b: str) -> bool:
    """Whether two local names are one file (``./x.csv`` and ``x.csv``, links included)."""
    from .io.streams import is_s3

    if "-" in (a, b) or is_s3(a) or is_s3(b):
        return a == b and a != "-"
    try:
        return os.path.samefile(a, b)
    except OSError:  # the output does not exist yet
        return Path(a).resolve() == Path(b).resolve()


def _check_input(uri: str, s3: Callable[[], Any]) -> None:
    """Before the model loads: the input exists and can be read."""
    from .io.streams import is_s3, s3_reason, split_s3

    if uri == "-":
        return
    if not is_s3(uri):
        from .errors import InputUnreadable

        if Path(uri).is_dir():
            raise InputUnreadable(f"input {uri!r} is a directory")
        if not Path(uri).exists():
            raise InputNotFound(f"input file {uri!r} does not exist")
        return
    from botocore.exceptions import BotoCoreError, ClientError

    from .errors import InputUnreadable

    bucket, key = split_s3(uri)
    try:
        s3().head_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as exc:
        reason = s3_reason(exc)
        if reason.startswith(("404", "NoSuchKey", "Not Found")):
            raise InputNotFound(f"input {uri} does not exist") from None
        raise InputUnreadable(f"cannot read {uri}: {reason}") from None


class _Bar:
    """The progress bar: percent and ETA of bytes read against the input's size (rows for
    Parquet), with the rows written; rows and rows/s alone when the size is unknown (stdin)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, total: int | None, unit: str, rows: int) -> None:
        from tqdm import tqdm

        kind = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if unit == "bytes" else {"unit": " rows"}
        self._bar = tqdm(total=total, desc="scoring", file=sys.stderr, ncols=100, mininterval=0.5, **kind)
        self._rows_unit = unit == "rows"

    def update(self, done: int, rows: int) -> None:
        if self._bar is None:
            return
        self._bar.n = done if not self._rows_unit or self._bar.total else rows
        if not self._rows_unit:
            self._bar.set_postfix_str(f"{rows} rows", refresh=False)
        self._bar.refresh() if self._bar.n >= (self._bar.total or 0) else self._bar.update(0)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _load_model(run: Any, model_dir: str) -> Any:
    _err(f"loading the model from {model_dir} ...")
    try:
        return run.load()
    except (RunError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file in the directory: exit 3 with what failed
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise ModelIncomplete(f"cannot load the model from {model_dir}: {type(exc).__name__}: {first}") from None


def summary_lines(result: Any, output: str, width: int = 100) -> list[str]:
    """The end-of-run summary, each line within ``width`` columns (the output path on a line of its own)."""
    st = result.stats
    failed = st.rows - st.scored
    parts: list[tuple[str, int]] = sorted(st.errors.items(), key=lambda kv: (-kv[1], kv[0]))
    head = f"rows {st.rows}: scored {st.scored}, errors {failed}"
    shown: list[str] = []
    for i, (code, n) in enumerate(parts):
        more = f"+{len(parts) - i - 1} more" if i < len(parts) - 1 else ""
        if len(head) + len(", ".join([*shown, f"{code} {n}", more])) + 3 > width:
            shown.append(f"+{len(parts) - i} more")
            break
        shown.append(f"{code} {n}")
    if shown:
        head += f" ({', '.join(shown)})"
    lines = [head]
    extra = []
    if result.resumed_rows:
        extra.append(f"{result.resumed_rows} from the resumed run")
    if result.kept_rows:
        extra.append(f"{result.kept_rows} kept as they were")
    second = f"truncated captions {st.truncated}, {result.pairs_per_second:.1f} pairs/s, {result.seconds:.1f} s"
    if extra:
        second += "; " + ", ".join(extra)
    lines.append(second[:width])
    lines.append(f"-> {output}")
    return lines


def _cmd_score(args: argparse.Namespace) -> int:
    from .bootstrap import build
    from .io.streams import is_s3, is_stream
    from .io.text import check_encoding
    from .pipeline.files import ErrorFilter, check_output_writable, score_file

    settings = settings_from(args)
    if args.encoding:
        check_encoding(args.encoding)
    only = ErrorFilter.parse(args.only_errors) if args.only_errors else None
    output = resolve_output(args.input, args.output, args.output_format, args.input_format)
    if _same_file(output, args.input):
        raise RunError(f"the output {output!r} is the input: name another with -o")
    base_dir = None if is_s3(args.input) or is_stream(args.input) else Path(args.input).resolve().parent
    run = build(settings, local_paths=True, base_dir=base_dir, default_cache=cache_cli.CLI_DEFAULT)
    try:
        _check_input(args.input, run.s3)
        check_output_writable(output, run.s3() if is_s3(output) else None)
        if args.summary_json:
            _check_summary_path(args.summary_json)
        model = _load_model(run, settings.model.dir)
        info = model.info
        _err(
            f"model {info.model_id} @ {info.revision} ({info.backend}/{info.device}/{info.dtype}, "
            f"loaded in {info.load_seconds:.1f}s)"
        )
        bar = _Bar() if args.progress or (not args.no_progress and sys.stderr.isatty()) else None
        s3 = run.s3() if is_s3(args.input) or is_s3(output) else None
        try:
            result = score_file(
                args.input,
                output,
                model,
                run.fetcher,
                s3,
                batch_size=settings.score.batch_size,
                workers=settings.score.workers,
                processes=settings.score.processes,
                url_column=args.url_column,
                caption_column=args.caption_column,
                input_format=args.input_format,
                output_format=args.output_format,
                encoding=args.encoding,
                excel_safe=settings.score.excel_safe,
                only_errors=only,
                on_partial="resume" if args.resume else "restart" if args.restart else "fail",
                commit_rows=settings.score.commit_rows,
                commit_seconds=settings.score.commit_seconds,
                progress=bar,
                cache=run.cache,
            )
        finally:
            if bar is not None:
                bar.close()
    finally:
        run.close()
    st = result.stats
    for line in summary_lines(result, output):
        _err(line)
    if run.cache is not None:
        for line in cache_cli.summary_lines(st.cache, run.cache.store.name):
            _err(line)
    code = EXIT_OK
    if st.rows and st.scored == 0:
        top = ", ".join(f"{k} {v}" for k, v in sorted(st.errors.items(), key=lambda kv: -kv[1])[:3])
        _err(f"warning: every row failed ({top}); exit status {EXIT_ROWS_FAILED}")
        code = EXIT_ROWS_FAILED
    elif args.fail_on_errors and st.scored < st.rows:
        _err(f"{st.rows - st.scored} rows have errors (--fail-on-errors): exit status {EXIT_ROWS_FAILED}")
        code = EXIT_ROWS_FAILED
    if args.summary_json:
        summary: dict[str, Any] = {
            "input": args.input,
            "output": output,
            "exit_status": code,
            "rows": st.rows,
            "scored": st.scored,
            "errors": st.errors,
            "truncated": st.truncated,
            "resumed_rows": result.resumed_rows,
            "kept_rows": result.kept_rows,
            "images_fetched": st.images_fetched,
            "captions_encoded": st.captions_encoded,
            "seconds": round(result.seconds, 3),
            "pairs_per_second": round(result.pairs_per_second, 2),
            "model": info.as_dict(),
            "cache": {"store": run.cache.store.name, **st.cache} if run.cache is not None else None,
        }
        try:
            Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:  # it went away since the check; the output itself is in place
            raise OutputUnwritable(f"--summary-json: cannot write {args.summary_json!r}: {exc.strerror}") from None
    return code


def _check_summary_path(path: str) -> None:
    """Before scoring, as for the output: the summary can be written there (a local file)."""
    from .io.streams import is_s3
    from .pipeline.files import check_output_writable

    if is_s3(path) or path == "-":
        raise OutputUnwritable(f"--summary-json takes a local file name, not {path!r}")
    try:
        check_output_writable(path)
    except OutputUnwritable as exc:
        raise OutputUnwritable(f"--summary-json: {exc}") from None


# ------------------------------------------------------------------------------------ model
def _add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("model", help="model directory tools")
    msub = m.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="download a CLIP checkpoint (needs network and the [hub] extra)")
    f.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    f.add_argument("--revision", default=None, help="branch, tag or commit (default: main, resolved to a commit)")
    f.add_argument("--to", required=True, dest="dest", help="target directory")
    i = msub.add_parser("info", help="check a model directory and print what would run it here")
    i.add_argument("dir", nargs="?", help="model directory (default $CLIP_MODEL_DIR)")
    e = msub.add_parser("export", help="write ONNX files (fp32 and int8) into the model directory (needs [export])")
    e.add_argument("dir", nargs="?", help="model directory (default $CLIP_MODEL_DIR)")
    e.add_argument("--no-int8", action="store_true", help="skip the int8 quantised files")


def model_info(directory: str, settings: Settings) -> tuple[dict[str, Any], str | None]:
    """What the directory holds, which backends are installed and could run it, and what the
    settings would run (``runs_as``) or why nothing can (the second value)."""
    from . import hardware
    from .backends import REGISTRY, onnx_files_present
    from .model import check_model_dir, read_identity, resolve
    from .model.directory import has_weights
    from .model.selection import runnable

    path = check_model_dir(directory, need_weights=False)
    model_id, revision = read_identity(path)
    m = settings.model
    backends = {
        name: {
            "installed": all(hardware.installed(mod) for mod in spec.requires),
            "can_run": runnable(name, path),
            "reads": "onnx/" if spec.needs_onnx else "model.safetensors",
        }
        for name, spec in REGISTRY.items()
    }
    info: dict[str, Any] = {
        "dir": str(path),
        "id": model_id,
        "revision": revision,
        "files": {
            "model.safetensors": has_weights(path),
            "onnx fp32": onnx_files_present(path, "fp32"),
            "onnx int8": onnx_files_present(path, "int8"),
        },
        "backends": backends,
        "settings": {"backend": m.backend, "device": m.device, "dtype": m.dtype},
        "runs_as": None,
    }
    try:
        picked = resolve(m.backend, m.device, path, m.dtype)
    except BackendUnavailable as exc:
        return info, str(exc)
    spec = REGISTRY[picked.backend]
    if not backends[picked.backend]["installed"]:
        extra = {"torch": "torch", "onnx": "cpu", "openvino": "cpu"}[picked.backend]
        return info, f"the {picked.backend} backend is not installed (pip install '.[{extra}]')"
    if not backends[picked.backend]["can_run"]:
        what = "ONNX files (run `similarity model export`)" if spec.needs_onnx else "model.safetensors"
        return info, f"the {picked.backend} backend needs {what}, which {path} lacks"
    if spec.needs_onnx:
        from .backends.files import check_exported_from

        try:
            check_exported_from(path)
        except ModelIncomplete as exc:
            return info, str(exc)
    if picked.backend == "onnx" and picked.dtype == "int8":  # OpenVINO's int8 reads the fp32 files
        if not onnx_files_present(path, "int8"):
            return info, f"int8 needs the int8 ONNX files, which {path} lacks (run `similarity model export`)"
        from .backends.onnx import per_channel_int8, unusable_int8_file

        if (bad := unusable_int8_file(path)) is not None:
            return info, per_channel_int8(bad, path)
    info["runs_as"] = picked.as_dict()
    return info, None


def _cmd_model(args: argparse.Namespace) -> int:
    if args.model_command == "fetch":
        from .tools.hub import fetch_model

        meta = fetch_model(args.dest, model_id=args.model_id, revision=args.revision)
        _err(f"fetched {meta['model_id']} @ {meta['revision']} into {args.dest}")
        return EXIT_OK
    settings = load(Settings)
    directory = args.dir or settings.model.dir
    if args.model_command == "info":
        info, problem = model_info(directory, settings)
        if problem:
            info["error"] = problem
        print(json.dumps(info, indent=2))
        if problem:
            _err(f"error: nothing can run this model here: {problem}")
            return EXIT_MODEL
        return EXIT_OK
    if args.model_command == "export":
        try:
            from .tools.onnx_export import export_onnx
        except ImportError:
            raise BackendUnavailable("exporting needs torch, transformers and onnx: pip install '.[export]'") from None
        try:
            written = export_onnx(directory, int8=not args.no_int8)
        except ImportError as exc:
            raise BackendUnavailable(f"exporting needs {exc.name or 'torch'}: pip install '.[export]'") from None
        except (RunError, ModelError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt weights: exit 3 with what failed
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise ModelIncomplete(f"cannot export {directory}: {type(exc).__name__}: {first}") from None
        for path in written:
            _err(f"wrote {path}")
        return EXIT_OK
    return EXIT_INPUT


# ------------------------------------------------------------------------------------ main
@dataclass(frozen=True)
class Command:
    name: str
    add: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]
    run: Callable[[argparse.Namespace], int]


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .server.cli import add_parser

    add_parser(sub)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server.cli import run

    return run(args)


#: The subcommands, in the order ``--help`` lists them.
COMMANDS: list[Command] = [
    Command("score", _add_score, _cmd_score),
    Command("model", _add_model, _cmd_model),
    Command("cache", cache_cli.add_command, cache_cli.run_command),
    Command("serve", _add_serve, _cmd_serve),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="similarity", description="Score how well captions describe images (CLIP).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null so the interpreter's final
    flush does not print a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM (a container or job scheduler stopping it) ends it like
    Ctrl-C: what was written is committed for ``--resume``."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        level = validated(LogSettings).level
    except ConfigError as exc:
        _err(f"error: {exc}")
        return EXIT_INPUT
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handler = {c.name: c.run for c in COMMANDS}[args.command]
    try:
        with _sigterm_interrupts():
            return handler(args)
    except ModelError as exc:
        from .tools.hub import PROVIDE_HINT

        _err(f"error: {exc}")
        if not isinstance(exc, ModelFetchFailed):
            _err(PROVIDE_HINT.format(model_id=DEFAULT_MODEL_ID))
        return EXIT_MODEL
    except RunError as exc:
        _err(f"error: {exc}")
        return EXIT_INPUT
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if not type(exc).__module__.startswith(("botocore", "boto3")):
            raise
        from .io.streams import s3_reason

        _err(f"error: S3 failed: {s3_reason(exc)}")  # a dropped connection, an endpoint that does not answer
        return EXIT_INPUT
    except KeyboardInterrupt:
        if args.command == "score":
            _err("interrupted: the output is not complete; the rows committed so far are kept: rerun with --resume")
        elif args.command == "model":
            _err("interrupted: the model directory may hold partial files: run the command again")
        else:
            _err("interrupted")
        return EXIT_INTERRUPTED
