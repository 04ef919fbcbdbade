"""Runs that survive a crash: a real CLI process killed at several points (SIGKILL, SIGINT,
SIGTERM), then ``--resume``. The resumed output is byte for byte the clean run's, and the rows the
killed run had committed are not fetched again (hits counted on the loopback image server).

The processes run the tiny model's ONNX files (``--backend onnx``: no torch to import, so each
starts in about a second), in batches of 8 with the embedding cache on, as a user's run is: a row's
numbers depend by ~1e-7 on its batch-mates, and the runs are byte for byte the same only because
batches form in row order, commits fall on window boundaries, and what the killed run embedded is
read back from its cache as it was stored (docs/cli.md)."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from support.imageserver import png_bytes
from support.shapes import draw

pytestmark = pytest.mark.slow

ROWS = 200  # a little over three of the scorer's 64-row windows: rows are written a window at a time
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def _slow_image(server, path: str, data: bytes, delay: float = 0.03) -> str:
    def route(h) -> None:
        time.sleep(delay)  # a run long enough to be killed in the middle
        h.send_plain(200, data, "image/png")

    server.routes[path] = route
    return server.url(path)


def _make_input(tmp_path: Path, server) -> tuple[Path, list[str]]:
    tag = uuid.uuid4().hex[:8]
    paths, lines = [], ["id,url,caption"]
    for i in range(ROWS):
        color, shape = COLORS[i % 4], SHAPES[i % 3]
        path = f"/resume/{tag}/{i}.png"
        url = _slow_image(server, path, png_bytes(draw(color, shape, random.Random(i))))
        paths.append(path)
        caption = f"a {color} {shape}" if i % 7 else f'a "{color}" {shape},\nwith a second line'
        lines.append(f'{i},{url},"{caption.replace(chr(34), chr(34) * 2)}"')
    lines.append(f"{ROWS},http://127.0.0.1:9/refused.png,a refused connection")  # a row error in the mix
    inp = tmp_path / "in.csv"
    inp.write_text("\n".join(lines) + "\n")
    return inp, paths


def _cmd(inp: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "similarity", "score", str(inp), "-o", str(out), "--model", str(model),
        "--backend", "onnx", "--dtype", "fp32", "--batch-size", "8", "--workers", "2", "--commit-rows", "5",
        "--allow-network", "127.0.0.1/32", "--timeout", "5", "--no-progress", *extra,
    ]  # fmt: skip


ENV = {
    **os.environ,
    "SIMILARITY_ALLOWED_NETWORKS": "",
    "SIMILARITY_COMMIT_SECONDS": "600",
    "SIMILARITY_MAX_RETRIES": "0",
}


def _env(cache: Path | None) -> dict[str, str]:
    return {**ENV, "SIMILARITY_CACHE": f"sqlite:///{cache}" if cache else "off"}


def _run(cmd: list[str], cache: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(cache), timeout=300)


def _committed(partial: Path) -> int:
    """Rows in the last complete line of the commit log (what a resume keeps)."""
    rows = -1
    log = partial / "commits.jsonl"
    if log.exists():
        for line in log.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                rows = json.loads(line)["rows"]
    return rows


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C handler:
    # give the child what a terminal gives a command, whatever ran this suite.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_after(
    cmd: list[str], partial: Path, rows: int, sig: signal.Signals, cache: Path | None = None
) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(cache), preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + 120
    while _committed(partial) < rows:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server, tiny_onnx_dir):
    """One clean run per output format, on one input: what every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("resume-ref")
    inp, paths = _make_input(tmp, server)
    outputs = {}
    for ext in ("csv", "jsonl.gz", "parquet"):
        out = tmp / f"clean.{ext}"
        r = _run(_cmd(inp, out, tiny_onnx_dir), cache=tmp / f"clean-{ext}.db")  # a cache of its own
        assert r.returncode == 0, r.stderr
        outputs[ext] = out.read_bytes()
    return inp, paths, outputs


@pytest.mark.parametrize(
    ("ext", "kill_at", "sig"),
    [
        ("csv", 0, signal.SIGKILL),  # only the header committed
        ("csv", 70, signal.SIGKILL),
        ("csv", 140, signal.SIGKILL),
        ("jsonl.gz", 60, signal.SIGINT),  # Ctrl-C
        ("parquet", 100, signal.SIGTERM),  # a scheduler stopping the job
    ],
)
def test_killed_run_resumes_to_the_clean_output(tmp_path, server, tiny_onnx_dir, reference, ext, kill_at, sig) -> None:
    src, paths, clean = reference
    inp = tmp_path / "in.csv"
    inp.write_bytes(src.read_bytes())  # the same rows, URLs included: the output must be the same bytes
    out = tmp_path / f"out.{ext}"
    partial = tmp_path / f"out.{ext}.partial"
    start = {p: server.hits[p] for p in paths}
    cache = tmp_path / "cache.db"  # the user's cache, shared by the killed and the resumed run
    killed = _kill_after(_cmd(inp, out, tiny_onnx_dir), partial, kill_at, sig, cache)
    err = killed.stderr.read().decode() if killed.stderr else ""
    if sig == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL
    else:
        assert killed.returncode == 130, err
        assert "rerun with --resume" in err and "Traceback" not in err
    assert not out.exists() and partial.is_dir()
    committed = _committed(partial)
    assert committed >= kill_at
    assert committed % 64 == 0  # on a window boundary (64 rows at batch 8), whatever --commit-rows says
    before = {p: server.hits[p] for p in paths}

    resumed = _run(_cmd(inp, out, tiny_onnx_dir, "--resume"), cache)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed} from the resumed run" in resumed.stderr or committed == 0
    got = out.read_bytes()
    if ext == "jsonl.gz":  # compare what the rows say; the gzip wrapper is deterministic too
        assert gzip.decompress(got) == gzip.decompress(clean[ext])
    assert got == clean[ext]
    assert not partial.exists()
    refetched = [i for i, p in enumerate(paths[:committed]) if server.hits[p] != before[p]]
    assert refetched == [], f"committed rows fetched again: {refetched}"
    assert all(server.hits[p] > start[p] for p in paths)  # every row was fetched by one run or the other


def test_resume_refuses_a_changed_input_or_model(tmp_path, server, tiny_onnx_dir) -> None:
    inp, _ = _make_input(tmp_path, server)
    out, partial = tmp_path / "out.csv", tmp_path / "out.csv.partial"
    _kill_after(_cmd(inp, out, tiny_onnx_dir), partial, 60, signal.SIGKILL)
    r = _run(_cmd(inp, out, tiny_onnx_dir, "--resume", "--backend", "openvino"))
    assert r.returncode == 2 and "cannot resume" in r.stderr and "model: was" in r.stderr, r.stderr
    r = _run(_cmd(inp, out, tiny_onnx_dir, "--resume", "--jpeg-draft", "2"))  # other pixels, same model
    assert r.returncode == 2 and "cannot resume" in r.stderr and "preprocess: was" in r.stderr, r.stderr
    inp.write_text(inp.read_text().replace("a red circle", "a red disc", 1))
    r = _run(_cmd(inp, out, tiny_onnx_dir, "--resume"))
    assert r.returncode == 2 and "cannot resume" in r.stderr and "input_identity" in r.stderr, r.stderr
    assert partial.is_dir()  # nothing was thrown away


def test_a_plain_rerun_neither_loses_nor_mixes_committed_rows(tmp_path, server, tiny_onnx_dir) -> None:
    inp, _ = _make_input(tmp_path, server)
    out, partial = tmp_path / "out.csv", tmp_path / "out.csv.partial"
    _kill_after(_cmd(inp, out, tiny_onnx_dir), partial, 60, signal.SIGKILL)
    r = _run(_cmd(inp, out, tiny_onnx_dir))
    assert r.returncode == 2 and "add --resume to continue it, or --restart to start over" in r.stderr
    assert partial.is_dir()
    r = _run(_cmd(inp, out, tiny_onnx_dir, "--restart"))
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) > ROWS and not partial.exists()
