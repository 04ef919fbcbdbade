"""The command line, run as users run it: a real process, real files, real servers."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from similarity.cli import main
from support.imageserver import png_bytes
from support.shapes import draw

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SIMILARITY_ALLOWED_NETWORKS": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "similarity", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


def _rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_scores_examples_with_tiny_model(tmp_path, tiny_clip_dir) -> None:
    out = tmp_path / "scored.csv"
    summary = tmp_path / "summary.json"
    r = _run(
        "score",
        "examples/challenge_set.csv",
        "-o",
        str(out),
        "--model",
        str(tiny_clip_dir),
        "--summary-json",
        str(summary),
    )
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    src = _rows(ROOT / "examples" / "challenge_set.csv")
    assert [(x["url"], x["caption"]) for x in rows] == [(x["url"], x["caption"]) for x in src]
    by_key = {(x["url"], x["caption"]): x for x in rows}
    right = float(by_key[("images/red_circle.png", "a red circle")]["similarity"])
    wrong = float(by_key[("images/red_circle.png", "a blue square")]["similarity"])
    assert right > wrong
    assert by_key[("images/missing.png", "a picture that is not there")]["error"].startswith("not_found")
    s = json.loads(summary.read_text())
    assert s["rows"] == len(src) and s["errors"] == {"not_found": 1, "missing_caption": 1}
    assert s["model"]["id"] == "tiny-clip-shapes"
    assert "rows 12: scored 10, errors 2" in r.stderr and "pairs/s" in r.stderr


def test_http_urls_with_allow_network(tmp_path, tiny_clip_dir, server) -> None:
    url = server.image("/cli/a.png", png_bytes(draw("green", "square", random.Random(4))))
    inp = tmp_path / "in.csv"
    inp.write_text(f"image_url,text,id\n{url},a green square,1\n{url},a red circle,2\n", encoding="utf-8")
    blocked = _run("score", str(inp), "--model", str(tiny_clip_dir))
    assert blocked.returncode == 4 and "warning: every row failed (blocked_address 2)" in blocked.stderr
    assert all(r["error"].startswith("blocked_address") for r in _rows(tmp_path / "in_scored.csv"))
    ok = _run("score", str(inp), "--model", str(tiny_clip_dir), "--allow-network", "127.0.0.1/32")
    assert ok.returncode == 0, ok.stderr
    rows = _rows(tmp_path / "in_scored.csv")
    assert [r["id"] for r in rows] == ["1", "2"] and all(r["error"] == "" for r in rows)
    assert float(rows[0]["similarity"]) > float(rows[1]["similarity"])
    env_ok = _run("score", str(inp), "--model", str(tiny_clip_dir), env={"SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32"})
    assert env_ok.returncode == 0 and _rows(tmp_path / "in_scored.csv")[0]["error"] == ""


def test_no_local_paths_flag(tmp_path, tiny_clip_dir) -> None:
    out = tmp_path / "o.csv"
    r = _run("score", "examples/challenge_set.csv", "-o", str(out), "--model", str(tiny_clip_dir), "--no-local-paths")
    assert r.returncode == 4, r.stderr  # every row failed: the output is written, the status says so
    assert all(x["error"].startswith(("local_path_disabled", "missing_caption")) for x in _rows(out))


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("missing-input", 2, "does not exist"),
        ("no-url-column", 2, "no image URL column"),
        ("no-model", 3, "does not exist"),
        ("incomplete-model", 3, "lacks model.safetensors"),
    ],
)
def test_clear_failures(tmp_path, tiny_clip_dir, setup, code, message) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("url,caption\nimages/x.png,a\n")
    model = str(tiny_clip_dir)
    if setup == "missing-input":
        inp = tmp_path / "nope.csv"
    elif setup == "no-url-column":
        inp.write_text("link,caption\nx,y\n")
    elif setup == "no-model":
        model = str(tmp_path / "no-model")
    elif setup == "incomplete-model":
        import shutil

        shutil.copytree(tiny_clip_dir, tmp_path / "m")
        (tmp_path / "m" / "model.safetensors").unlink()
        model = str(tmp_path / "m")
    r = _run("score", str(inp), "--model", model, "--backend", "torch")
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "in_scored.csv").exists()  # nothing half-written
    if code == 3:
        assert "CLIP_MODEL_DIR" in r.stderr  # says how to provide the model


def test_model_fetch_fails_clearly_offline(tmp_path) -> None:
    r = _run("model", "fetch", "--to", str(tmp_path / "m"), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 3
    assert "could not download openai/clip-vit-base-patch32" in r.stderr
    assert "CLIP_MODEL_DIR" in r.stderr and "Traceback" not in r.stderr


def test_s3_input_and_output(s3, bucket, tiny_clip_dir, moto_endpoint, capsys) -> None:
    img = png_bytes(draw("yellow", "triangle", random.Random(9)))
    s3.put_object(Bucket=bucket, Key="imgs/t.png", Body=img)
    body = f"url,caption\ns3://{bucket}/imgs/t.png,a yellow triangle\ns3://{bucket}/imgs/none.png,x\n"
    s3.put_object(Bucket=bucket, Key="in/data.csv", Body=("\ufeff" + body).encode())
    code = main(
        ["score", f"s3://{bucket}/in/data.csv", "-o", f"s3://{bucket}/out/data.csv", "--model", str(tiny_clip_dir)]
    )
    assert code == 0, capsys.readouterr().err
    text = s3.get_object(Bucket=bucket, Key="out/data.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["error"] == "" and float(rows[0]["similarity"]) > 0
    assert rows[1]["error"].startswith("not_found")


def test_bad_allow_network_is_a_clear_error(tmp_path, tiny_clip_dir) -> None:
    r = _run("score", "examples/challenge_set.csv", "-o", str(tmp_path / "o.csv"), "--allow-network", "10.0.0.0/99")
    assert r.returncode == 2 and "invalid network" in r.stderr and "Traceback" not in r.stderr
    r = _run("score", "examples/challenge_set.csv", "-o", str(tmp_path / "o.csv"), "--streams", "0")
    assert r.returncode == 2 and "--streams: Input should be greater than or equal to 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_model_info_says_what_auto_runs(tiny_clip_dir) -> None:
    r = _run("model", "info", str(tiny_clip_dir), env={"SIMILARITY_DTYPE": "fp32"})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["files"] == {"model.safetensors": True, "onnx fp32": False, "onnx int8": False}
    # Exact scores asked for and no ONNX files: torch fp32 (the device stays auto: CUDA when present)
    assert (info["runs_as"]["backend"], info["runs_as"]["dtype"]) == ("torch", "fp32")
    assert info["backends"]["onnx"] == {"installed": True, "can_run": False, "reads": "onnx/"}
    r = _run("model", "info", str(tiny_clip_dir / "missing"))
    assert r.returncode == 3 and "does not exist" in r.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIMILARITY_BACKEND": "onnx"}, "the onnx backend needs ONNX files"),
        ({"SIMILARITY_BACKEND": "openvino"}, "the openvino backend needs ONNX files"),
        ({"SIMILARITY_BACKEND": "onnx", "SIMILARITY_DTYPE": "int8"}, "the onnx backend needs ONNX files"),
    ],
)
def test_model_info_never_reports_what_cannot_run(tiny_clip_dir, env, message) -> None:
    # Before: `runs_as` said onnx/openvino for a directory without ONNX files, and exit 0.
    r = _run("model", "info", str(tiny_clip_dir), env=env)
    assert r.returncode == 3, r.stdout
    info = json.loads(r.stdout)
    assert info["runs_as"] is None and message in info["error"] and message in r.stderr
