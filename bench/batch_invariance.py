"""How often a row's printed score depends on which rows share its batch (what decides whether a
resumed run, or a second clean run, is byte for byte the first one; docs/cli.md, "--resume").

    .venv/bin/python bench/batch_invariance.py [--model DIR] [--rows 3000] [--images 400]

Scores the same generated rows (``--images`` distinct PNG files, captions of varied length) at
batch sizes 1, 7 and 32 with each backend installed, and counts the rows whose formatted
``similarity``/``cosine`` differ from batch size 1's, and the largest raw cosine difference.
The default model is the trained tiny test model; ``--model`` takes a full-size directory with
ONNX files (bench/run.py makes one). Reads local files only: it opens no socket.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from similarity import Fetcher, FetchSettings, Record, load_model, score_pairs  # noqa: E402
from similarity.errors import ModelError  # noqa: E402
from support.imageserver import png_bytes  # noqa: E402
from support.shapes import COLOURS, SHAPES, draw  # noqa: E402

BATCHES = (1, 7, 32)


def make_rows(root: Path, rows: int, images: int) -> list[Record]:
    colours, shapes = list(COLOURS), list(SHAPES)
    for i in range(images):
        rng = random.Random(i)
        (root / f"{i}.png").write_bytes(png_bytes(draw(rng.choice(colours), rng.choice(shapes), rng)))
    out = []
    for i in range(rows):
        rng = random.Random(10_000 + i)
        words = " ".join(rng.choice(["small", "bright", "old", "shiny", "soft"]) for _ in range(rng.randrange(12)))
        caption = f"a {words} {rng.choice(colours)} {rng.choice(shapes)}".replace("  ", " ")
        out.append(Record(str(root / f"{rng.randrange(images)}.png"), caption))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--images", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="batch-inv-") as tmp:
        root = Path(tmp)
        model_dir = args.model
        if model_dir is None:  # the tiny model, with ONNX files exported into the temp dir
            model_dir = root / "tiny-clip"
            shutil.copytree(ROOT / "tests" / "fixtures" / "tiny-clip", model_dir)
            try:
                from similarity.tools.onnx_export import export_onnx

                export_onnx(model_dir, int8=False)
            except ImportError:
                pass  # torch only
        (root / "img").mkdir()
        records = make_rows(root / "img", args.rows, args.images)
        fetcher = Fetcher(FetchSettings(allow_local_paths=True))
        cpu = (
            next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                platform.processor(),
            )
            if Path("/proc/cpuinfo").exists()
            else platform.processor()
        )
        print(f"CPU: {cpu} ({platform.machine()}); model {model_dir.name}; {args.rows} rows, {args.images} images")
        for backend, dtype in (("torch", "fp32"), ("onnx", "fp32"), ("openvino", "auto")):
            try:
                model = load_model(model_dir, backend=backend, dtype=dtype)  # type: ignore[arg-type]
            except (ModelError, ImportError) as exc:  # not installed, or no ONNX files
                print(f"{backend:9s} skipped: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            runs = {b: list(score_pairs(records, model, fetcher, batch_size=b, workers=4)) for b in BATCHES}
            ref = runs[1]
            for b in BATCHES[1:]:
                printed = sum(
                    (f"{x.similarity:.4f}", f"{x.cosine:.4f}") != (f"{y.similarity:.4f}", f"{y.cosine:.4f}")
                    for x, y in zip(ref, runs[b], strict=True)
                )
                raw = max(abs((x.cosine or 0.0) - (y.cosine or 0.0)) for x, y in zip(ref, runs[b], strict=True))
                print(
                    f"{backend:9s} {model.info.dtype:5s} batch {b:2d} vs 1: {printed} of {len(ref)} rows print differently, max |d cosine| {raw:.1e}"
                )
        fetcher.close()


if __name__ == "__main__":
    main()
