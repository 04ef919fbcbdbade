"""``similarity`` command line: ``score`` a CSV, ``model fetch|info|export``.

Exit status: 0 when the file was processed (row errors included), 2 when the input cannot be
processed (missing file, no URL column, malformed CSV, a bad flag or variable), 3 when the model is
missing or incomplete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import Settings, load
from .errors import InputNotFound, ModelError, ModelFetchFailed, RunError
from .model.directory import DEFAULT_MODEL_ID

EXIT_INPUT = 2
EXIT_MODEL = 3

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
    },
    "fetch": {
        "deadline": "--timeout",
        "max_image_bytes": "--max-image-bytes",
        "allow_local_paths": "--no-local-paths",
        "allowed_networks": "--allow-network",
    },
    "score": {"batch_size": "--batch-size", "workers": "--workers", "excel_safe": "--excel-safe"},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="similarity", description="Score how well captions describe images (CLIP).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score a CSV of (image, caption) rows")
    s.add_argument("input", help="CSV path, s3://bucket/key, or - for stdin")
    s.add_argument("-o", "--output", help="output path or s3:// URI (default: INPUT_scored.csv; - for stdout)")
    s.add_argument("--model", help="model directory (default: $CLIP_MODEL_DIR or models/clip-vit-base-patch32)")
    s.add_argument("--backend", choices=["auto", "torch", "onnx", "openvino"], help="inference backend (default auto)")
    s.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="precision (default auto: the fastest within 0.002 of fp32 on this machine)",
    )
    s.add_argument("--batch-size", type=int, help="images/captions per model call (default 32)")
    s.add_argument("--workers", type=int, help="concurrent image downloads (default 16)")
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
    s.add_argument("--excel-safe", action="store_true", help="prefix cells starting with = + - @ with '")
    s.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    s.add_argument("--summary-json", help="also write the run summary as JSON to this path")

    m = sub.add_parser("model", help="model directory tools")
    msub = m.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="download a CLIP checkpoint (needs network)")
    f.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    f.add_argument("--revision", default=None, help="branch, tag or commit (default: main, resolved to a commit)")
    f.add_argument("--to", required=True, dest="dest", help="target directory")
    i = msub.add_parser("info", help="check a model directory and print what it holds")
    i.add_argument("dir", nargs="?", help="model directory (default $CLIP_MODEL_DIR)")
    e = msub.add_parser("export", help="write ONNX files (fp32 and int8) into the model directory")
    e.add_argument("dir", nargs="?", help="model directory (default $CLIP_MODEL_DIR)")
    e.add_argument("--no-int8", action="store_true", help="skip the int8 quantised files")
    return p


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
    return settings.with_overrides(
        "score",
        {
            "batch_size": args.batch_size,
            "workers": args.workers,
            "excel_safe": True if args.excel_safe else None,
        },
        FLAGS["score"],
    )


def _cmd_score(args: argparse.Namespace) -> int:
    from .bootstrap import build
    from .io.streams import default_output, is_s3

    settings = settings_from(args)
    output = args.output or default_output(args.input)
    if not is_s3(args.input) and args.input != "-" and not Path(args.input).is_file():
        raise InputNotFound(f"input file {args.input!r} does not exist")
    base_dir = None if is_s3(args.input) or args.input == "-" else Path(args.input).resolve().parent
    run = build(settings, local_paths=True, base_dir=base_dir)
    info = run.load().info
    _err(
        f"model {info.model_id} @ {info.revision} ({info.backend}/{info.device}/{info.dtype}, "
        f"loaded in {info.load_seconds:.1f}s)"
    )

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit=" rows", desc="scoring", file=sys.stderr, dynamic_ncols=True)
    try:
        result = run.score_csv(
            args.input,
            output,
            url_column=args.url_column,
            caption_column=args.caption_column,
            on_row=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
        run.close()
    st = result.stats
    errors = ", ".join(f"{k}={v}" for k, v in sorted(st.errors.items(), key=lambda kv: -kv[1])) or "none"
    _err(
        f"rows: {st.rows}  scored: {st.scored}  errors: {st.rows - st.scored} ({errors})  "
        f"truncated captions: {st.truncated}  {result.pairs_per_second:.1f} pairs/s  -> {output}"
    )
    if args.summary_json:
        summary: dict[str, Any] = {
            "input": args.input,
            "output": output,
            "rows": st.rows,
            "scored": st.scored,
            "errors": st.errors,
            "truncated": st.truncated,
            "images_fetched": st.images_fetched,
            "captions_encoded": st.captions_encoded,
            "seconds": round(result.seconds, 3),
            "pairs_per_second": round(result.pairs_per_second, 2),
            "model": info.as_dict(),
        }
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from .model import check_model_dir, read_identity

    if args.model_command == "fetch":
        from .tools.hub import fetch_model

        meta = fetch_model(args.dest, model_id=args.model_id, revision=args.revision)
        _err(f"fetched {meta['model_id']} @ {meta['revision']} into {args.dest}")
        return 0
    settings = load(Settings)
    directory = args.dir or settings.model.dir
    if args.model_command == "info":
        from .backends import onnx_files_present
        from .model import resolve

        path = check_model_dir(directory, need_weights=False)
        model_id, revision = read_identity(path)
        m = settings.model
        picked = resolve(m.backend, m.device, path, m.dtype)
        print(
            json.dumps(
                {
                    "dir": str(path),
                    "id": model_id,
                    "revision": revision,
                    "onnx": {d: onnx_files_present(path, d) for d in ("fp32", "int8")},
                    "runs_as": picked.as_dict(),
                },
                indent=2,
            )
        )
        return 0
    if args.model_command == "export":
        from .tools.onnx_export import export_onnx

        for written in export_onnx(directory, int8=not args.no_int8):
            _err(f"wrote {written}")
        return 0
    return 1


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("SIMILARITY_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    args = _parser().parse_args(argv)
    try:
        if args.command == "score":
            return _cmd_score(args)
        return _cmd_model(args)
    except ModelError as exc:
        from .tools.hub import PROVIDE_HINT

        _err(f"error: {exc}")
        if not isinstance(exc, ModelFetchFailed):
            _err(PROVIDE_HINT.format(model_id=DEFAULT_MODEL_ID))
        return EXIT_MODEL
    except RunError as exc:
        _err(f"error: {exc}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _err("interrupted; no output written")
        return 130
