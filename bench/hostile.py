"""Memory and time that hostile images cost, under the services' settings.

    .venv/bin/python bench/hostile.py [--images 24] [--side 9000] [--model full|tiny] [--backend torch|onnx]

1. Decoded memory in flight: ``--images`` different ``--side`` x ``--side`` PNGs (each under the
   pixel limit and the byte cap; ~1 MB each on the wire) scored in one ``POST /score`` call
   (``ApiService.score``, what the API function and, chunk by chunk, the workers run), in a fresh
   process whose settings are the functions' (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE=4096``, 16
   workers, batch 32). Printed: that process's peak RSS (VmHWM), with the decode budget the
   settings derive and, interleaved, with the budget out of the way (main's behaviour).
   The CLI then scores a CSV of the same URLs with this machine's defaults, with and without the
   budget.
2. Extreme aspect ratio: a 20000x3 PNG preprocessed at 224 px, ours against CLIPImageProcessor's
   full resize: time, peak RSS and pixel drift.

The model is a full-size ViT-B/32 with random weights (the deployed model's memory; ``--model
tiny`` uses the test model instead). Everything it contacts is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

LIMIT_MB = 4096  # the API's and the chunk workers' MemorySize in template.yaml


def log(msg: str) -> None:
    print(msg, flush=True)


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


# ------------------------------------------------------------------------------ child processes
def child_score(urls_file: str) -> None:
    """One /score call in a process configured as the functions are (from the environment)."""
    from similarity.api import ApiService
    from similarity.bootstrap import build
    from similarity.config import ServiceSettings, load
    from similarity.model.preprocess import decode_budget, decode_limits

    settings = load(ServiceSettings)
    run = build(settings, local_paths=False)
    run.load()
    loaded = peak_mb()
    urls = json.loads(Path(urls_file).read_text())
    body = json.dumps({"pairs": [{"image": u, "caption": f"a photo {i}"} for i, u in enumerate(urls)]})
    t = time.perf_counter()
    scored = ApiService(settings, run).score(body, time_left=600.0)
    secs = time.perf_counter() - t
    errors = [r["error"] for r in scored.response.body["results"] if r["error"]]
    limits = decode_limits()
    out = {
        "peak_mb": peak_mb(),
        "after_model_load_mb": loaded,
        "seconds": secs,
        "errors": errors,
        "budget_mp": limits.budget_megapixels,
        "max_pixels": limits.max_pixels,
        "budget_peak_mp": decode_budget().peak / 1e6,
        "workers": settings.score.workers,
    }
    print("RESULT " + json.dumps(out))


def child_cli(csv_path: str) -> None:
    """The CLI on a CSV of the same URLs, with this machine's defaults (its memory and cores)."""
    from similarity.cli import main
    from similarity.model.preprocess import decode_budget, decode_limits

    t = time.perf_counter()
    rc = main(["score", csv_path, "-o", csv_path + ".out.csv", "--allow-network", "127.0.0.1/32", "--no-progress"])
    secs = time.perf_counter() - t
    limits = decode_limits()
    out = {
        "peak_mb": peak_mb(),
        "seconds": secs,
        "rc": rc,
        "errors": [],
        "budget_mp": limits.budget_megapixels,
        "max_pixels": limits.max_pixels,
        "budget_peak_mp": decode_budget().peak / 1e6,
    }
    print("RESULT " + json.dumps(out))


def child_aspect(which: str, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    from similarity.model.preprocess import PreprocessConfig, preprocess

    img = Image.new("RGB", (width, height))
    img.putdata([((x * 37) % 256, (x * 11) % 256, 128) for x in range(width)] * height)
    if which == "ours":
        t = time.perf_counter()
        px = preprocess(img, PreprocessConfig())
    else:
        from transformers import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil()
        t = time.perf_counter()
        px = processor(images=img, return_tensors="np")["pixel_values"][0]
    secs = time.perf_counter() - t
    np.save(os.environ["ASPECT_OUT"], px)
    print("RESULT " + json.dumps({"peak_mb": peak_mb(), "seconds": secs}))


def run_child(args: list[str], env: dict[str, str]) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
        timeout=1800,
    )
    if r.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])


# ------------------------------------------------------------------------------ the bench
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--side", type=int, default=9000)
    ap.add_argument("--model", choices=["full", "tiny"], default="full")
    ap.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--no-compare", action="store_true", help="skip the run without a budget (~5 GB peak)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-hostile.json"))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "score":
            child_score(args.child[1])
        elif args.child[0] == "cli":
            child_cli(args.child[1])
        else:
            child_aspect(args.child[1], int(args.child[2]), int(args.child[3]))
        return

    from run import cpu_description, make_model  # bench/run.py: the CPU line and the random ViT-B/32
    from support.imageserver import ImageServer, banded_png

    cpu = cpu_description()
    results: dict = {"machine": cpu, "limit_mb": LIMIT_MB}
    log(f"CPU: {cpu.get('model_name')}, {cpu['cores']} cores")
    with tempfile.TemporaryDirectory(prefix="hostile-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model == "full":
            model_dir = tmp / "model"
            t = time.perf_counter()
            make_model(model_dir)
            if args.backend == "onnx":
                from similarity.tools.onnx_export import export_onnx

                export_onnx(model_dir)
            log(f"model: random full-size ViT-B/32 ({args.backend}), made in {time.perf_counter() - t:.0f}s")
        else:
            model_dir = ROOT / "tests" / "fixtures" / "tiny-clip"
            log("model: the tiny test model (memory figures are then below the deployed model's)")

        srv = ImageServer("127.0.0.1").start()
        try:
            t = time.perf_counter()
            pngs = [banded_png(args.side, args.side, seed=i) for i in range(args.images)]
            urls = [srv.image(f"/big/{i}.png", data) for i, data in enumerate(pngs)]
            results["png_bytes_total"] = sum(map(len, pngs))
            del pngs
            log(
                f"{args.images} different {args.side}x{args.side} PNGs ({results['png_bytes_total'] / 1e6:.1f} MB in all) "
                f"made in {time.perf_counter() - t:.0f}s"
            )
            urls_file = tmp / "urls.json"
            urls_file.write_text(json.dumps(urls))
            base_env = {
                "CLIP_MODEL_DIR": str(model_dir),
                "SIMILARITY_BACKEND": args.backend,
                "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(LIMIT_MB),
                "MALLOC_MMAP_THRESHOLD_": "33554432",  # what the container sets (Dockerfile)
                "MALLOC_TRIM_THRESHOLD_": "8589934592",
                "OMP_WAIT_POLICY": "PASSIVE",
            }
            runs = [("budget", {})]
            if not args.no_compare:
                runs += [("no budget", {"SIMILARITY_DECODE_BUDGET_MP": "1000000"}), ("budget", {})]
            results["score"] = []
            for name, extra in runs:
                out = run_child(["--child", "score", str(urls_file)], {**base_env, **extra})
                out["run"] = name
                results["score"].append(out)
                log(
                    f"/score with {args.images} x {args.side}x{args.side} PNGs, {name:9s}: peak RSS "
                    f"{out['peak_mb']:6.0f} MB (model loaded: {out['after_model_load_mb']:.0f} MB), "
                    f"{out['seconds']:.1f}s, budget {out['budget_mp']:.0f} MP (most held {out['budget_peak_mp']:.0f} MP), "
                    f"pixel limit {out['max_pixels']:,}, {len(out['errors'])} row errors"
                )
            csv_file = tmp / "big.csv"
            csv_file.write_text("url,caption\n" + "".join(f"{u},a photo {i}\n" for i, u in enumerate(urls)))
            cli_env = {"CLIP_MODEL_DIR": str(model_dir), "SIMILARITY_BACKEND": args.backend}
            results["cli"] = []
            for name, extra in runs[: 2 if len(runs) > 1 else 1]:
                out = run_child(["--child", "cli", str(csv_file)], {**cli_env, **extra})
                out["run"] = name
                results["cli"].append(out)
                log(
                    f"CLI on this machine ({results['machine']['cores']} cores, its memory), {name:9s}: peak RSS "
                    f"{out['peak_mb']:6.0f} MB, {out['seconds']:.1f}s, budget {out['budget_mp']:.0f} MP "
                    f"(most held {out['budget_peak_mp']:.0f} MP), exit {out['rc']}"
                )
        finally:
            srv.stop()

        import numpy as np

        aspect = {}
        for which in ("ours", "reference"):
            npy = tmp / f"{which}.npy"
            out = run_child(["--child", "aspect", which, "20000", "3"], {"ASPECT_OUT": str(npy)})
            aspect[which] = out
            log(f"20000x3 at 224 px, {which:9s}: {out['seconds']:.3f}s, peak RSS {out['peak_mb']:.0f} MB")
        std = np.asarray((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)[:, None, None]
        levels = np.abs(np.load(tmp / "ours.npy") - np.load(tmp / "reference.npy")) * std * 255
        aspect["drift_levels_max"] = float(levels.max())
        aspect["drift_levels_mean"] = float(levels.mean())
        log(f"20000x3: pixel drift against the reference: max {levels.max():.2f} levels, mean {levels.mean():.3f}")
        results["aspect_20000x3"] = aspect

    budgeted = [r["peak_mb"] for r in results["score"] if r["run"] == "budget"]
    verdict = "under" if max(budgeted) < LIMIT_MB else "OVER"
    log(f"peak with the services' settings: {max(budgeted):.0f} MB, {verdict} the functions' {LIMIT_MB} MB")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
