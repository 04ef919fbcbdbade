"""The command line, run as users run it: a real process, real files, real servers."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
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


def test_worker_processes_write_the_same_bytes(tmp_path, tiny_clip_dir) -> None:
    """``--processes 2``: local files, the challenge set's errors and all, as the threads write them."""
    outs = []
    for extra in ([], ["--processes", "2"]):
        out = tmp_path / f"scored{len(extra)}.csv"
        r = _run(
            "score", "examples/challenge_set.csv", "-o", str(out), "--model", str(tiny_clip_dir), "--no-cache", *extra
        )
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and b"not_found" in outs[1]


def test_device_pixels_write_the_same_bytes(tmp_path, tiny_clip_dir) -> None:
    """``--pixels torch`` (the resize on the model's device, here the CPU) writes what Pillow's path
    writes, errors and all; processes with it are refused, naming both."""
    outs = []
    for extra in ([], ["--pixels", "torch"]):
        out = tmp_path / f"scored{len(extra)}.csv"
        r = _run("score", "examples/challenge_set.csv", "-o", str(out), "--model", str(tiny_clip_dir), "--no-cache",
                 "--backend", "torch", *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and b"not_found" in outs[1]
    both = _run("score", "examples/challenge_set.csv", "-o", str(tmp_path / "x.csv"), "--model", str(tiny_clip_dir),
                "--backend", "torch", "--pixels", "torch", "--processes", "2")  # fmt: skip
    assert both.returncode == 2 and "SIMILARITY_PROCESSES=2 with SIMILARITY_PIXELS=torch" in both.stderr


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
        [
            "score",
            f"s3://{bucket}/in/data.csv",
            "-o",
            f"s3://{bucket}/out/data.csv",
            "--model",
            str(tiny_clip_dir),
            "--progress",
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "100%|" in err and "2 rows" in err  # the S3 object's size is the bar's total
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


# ------------------------------------------------------------------ issue 17: outputs that are not lost
def _challenge(tmp_path: Path) -> Path:
    """A copy of the examples (CSV + images) in a scratch folder."""
    shutil.copytree(ROOT / "examples", tmp_path / "ex")
    return tmp_path / "ex" / "challenge_set.csv"


@pytest.mark.parametrize("form", ["slash", "existing-dir"])
def test_output_folder_gets_the_default_name(tmp_path, tiny_clip_dir, form) -> None:
    # Before: exit 0, "-> some/dir/", and only a hidden .part file left in the folder.
    inp = _challenge(tmp_path)
    folder = tmp_path / "results"
    if form == "existing-dir":
        folder.mkdir()
    arg = str(folder) + ("/" if form == "slash" else "")
    code = main(["score", str(inp), "-o", arg, "--model", str(tiny_clip_dir)])
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["challenge_set_scored.csv"]
    assert len(_rows(folder / "challenge_set_scored.csv")) == 12


def test_s3_output_is_checked_before_scoring(tmp_path, tiny_clip_dir, server, moto_endpoint, capsys) -> None:
    # Before: every row was scored, then a 50-line traceback, and the result deleted.
    url = server.image("/cli/pre.png", png_bytes(draw("red", "circle", random.Random(1))))
    inp = tmp_path / "in.csv"
    inp.write_text(f"url,caption\n{url},a red circle\n")
    args = ["score", str(inp), "-o", "s3://no-such-bucket-here/out.csv", "--model", str(tiny_clip_dir)]
    code = main([*args, "--allow-network", "127.0.0.1/32"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write s3://no-such-bucket-here/out.csv: NoSuchBucket" in err, err
    assert server.hits["/cli/pre.png"] == 0  # nothing was scored
    assert "Traceback" not in err and "loading the model" not in err  # refused before the model loads


def _no_credentials_env(moto_endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # No keys, no profile, no instance metadata: botocore finds no credentials and sends nothing.
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=moto_endpoint,
        SIMILARITY_ALLOWED_NETWORKS="",
    )
    return env


@pytest.mark.parametrize("side", ["input", "output"])
def test_s3_without_credentials_is_exit_2(tmp_path, tiny_clip_dir, moto_endpoint, side) -> None:
    # Before: the input side was a botocore traceback with exit 1.
    local = _challenge(tmp_path)
    args = (
        ["score", "s3://some-bucket/in.csv", "-o", str(tmp_path / "o.csv")]
        if side == "input"
        else ["score", str(local), "-o", "s3://some-bucket/out.csv"]
    )
    r = subprocess.run(
        [sys.executable, "-m", "similarity", *args, "--model", str(tiny_clip_dir)],
        capture_output=True,
        text=True,
        env=_no_credentials_env(moto_endpoint),
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "no AWS credentials found" in r.stderr and "Traceback" not in r.stderr


def test_failed_upload_keeps_the_scored_file(tmp_path, tiny_clip_dir, s3, bucket, monkeypatch, capsys) -> None:
    # The upload is the one step that cannot be made to fail for real after the preflight passed
    # (moto has no permissions to revoke half-way), so the client's upload_file is replaced.
    from botocore.exceptions import ClientError

    from similarity import bootstrap

    class Failing:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def upload_file(self, *a, **kw):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")

    monkeypatch.setattr(bootstrap, "S3Provider", lambda client=None: lambda: Failing(s3))
    monkeypatch.chdir(tmp_path)
    inp = _challenge(tmp_path)
    code = main(["score", str(inp), "-o", f"s3://{bucket}/scored/out.csv", "--model", str(tiny_clip_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "the upload to" in err and "AccessDenied" in err
    kept = tmp_path / "out.csv"
    assert f"kept at {kept}" in err and len(_rows(kept)) == 12
    assert not list(tmp_path.glob(".similarity-partial/*"))


# ------------------------------------------------------------------ issue 17 / 22 B5: encodings
def _score_in_process(inp: Path, tiny_clip_dir: Path, *extra: str) -> tuple[int, str]:
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["score", str(inp), "--model", str(tiny_clip_dir), *extra])
    return code, err.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # cp1252 from Excel: é is 0xE9
        ("url,caption\nimages/red_circle.png,caf\xe9 au lait\n".encode("cp1252"), "byte 37 (line 2: bytes e9)"),
        # Latin-1 with a character cp1252 has at another place
        ("url,caption\nimages/red_circle.png,\xa9 \xfc\n".encode("latin-1"), "byte 34 (line 2: bytes a9)"),
        # one broken byte in an otherwise UTF-8 file, far into it
        (("url,caption\n" + "images/red_circle.png,ok ✓\n" * 500).encode() + b"images/x.png,bad\xff\n", "line 502"),
        # UTF-16 without a byte-order mark
        ("url,caption\nimages/red_circle.png,a\n".encode("utf-16-le"), "looks like UTF-16 without a byte-order mark"),
    ],
)
def test_text_that_is_not_utf8_is_exit_2_with_the_offset(tmp_path, tiny_clip_dir, data, message) -> None:
    # Before: exit 1 with a UnicodeDecodeError traceback and no output.
    inp = _challenge(tmp_path).with_name("in.csv")
    inp.write_bytes(data)
    code, err = _score_in_process(inp, tiny_clip_dir)
    assert code == 2 and "bad_encoding" in err and message in err, err
    assert "--encoding" in err and "Traceback" not in err
    assert not inp.with_name("in_scored.csv").exists() and not list(inp.parent.glob("*.partial"))


def test_encoding_flag_reads_legacy_files(tmp_path, tiny_clip_dir) -> None:
    inp = _challenge(tmp_path).with_name("in.csv")
    inp.write_bytes("url,caption,note\nimages/red_circle.png,a red circle,café\n".encode("cp1252"))
    code, err = _score_in_process(inp, tiny_clip_dir, "--encoding", "cp1252")
    assert code == 0, err
    out = inp.with_name("in_scored.csv")
    assert _rows(out)[0]["note"] == "café" and out.read_bytes().decode("utf-8")  # written as UTF-8


def test_utf16_with_a_byte_order_mark_just_works(tmp_path, tiny_clip_dir) -> None:
    inp = _challenge(tmp_path).with_name("in.tsv")
    inp.write_bytes("url\tcaption\nimages/red_circle.png\ta red circle ✓\n".encode("utf-16"))  # Excel's "Unicode text"
    code, err = _score_in_process(inp, tiny_clip_dir)
    assert code == 0, err
    out = inp.with_name("in_scored.tsv")
    assert (
        list(csv.DictReader(out.open(encoding="utf-8", newline=""), delimiter="\t"))[0]["caption"] == "a red circle ✓"
    )


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_an_explicit_utf16_encoding_drops_the_byte_order_mark(tmp_path, tiny_clip_dir, codec) -> None:
    # Before: the header's first name kept U+FEFF, so the URL column was not found (exit 2).
    inp = _challenge(tmp_path).with_name("in.csv")
    inp.write_bytes("\ufeffurl,caption\nimages/red_circle.png,a red circle\n".encode(codec))
    code, err = _score_in_process(inp, tiny_clip_dir, "--encoding", codec)
    assert code == 0, err
    assert list(_rows(inp.with_name("in_scored.csv"))[0])[:2] == ["url", "caption"]


def test_unknown_encoding_is_a_flag_error(tmp_path, tiny_clip_dir) -> None:
    code, err = _score_in_process(_challenge(tmp_path), tiny_clip_dir, "--encoding", "klingon")
    assert code == 2 and "--encoding: unknown encoding 'klingon'" in err


def test_unclosed_quote_is_exit_2_and_writes_nothing(tmp_path, tiny_clip_dir) -> None:
    # issue 22 B6. Before: exit 0 with 1 row, the caption holding the next two lines.
    inp = _challenge(tmp_path).with_name("in.csv")
    inp.write_text('url,caption\nimages/red_circle.png,fine\nimages/red_circle.png,"a red circle\n2,U,b\n3,U,c\n')
    code, err = _score_in_process(inp, tiny_clip_dir)
    assert code == 2 and "malformed_csv: line 3:" in err and "never closed" in err
    assert not inp.with_name("in_scored.csv").exists() and not list(inp.parent.glob("*.partial"))


@pytest.mark.parametrize("where", ["missing-folder", "a-directory"])
def test_an_unwritable_summary_path_is_exit_2_before_scoring(tmp_path, tiny_clip_dir, where) -> None:
    # Before: a FileNotFoundError / IsADirectoryError traceback after the output was written.
    inp = _challenge(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    summary = str(blocker / "s.json") if where == "missing-folder" else str(tmp_path)
    code, err = _score_in_process(inp, tiny_clip_dir, "--summary-json", summary)
    assert code == 2 and "--summary-json" in err and "Traceback" not in err, err
    assert not inp.with_name("challenge_set_scored.csv").exists()


def test_a_cut_gzip_input_is_exit_2_and_leaves_nothing_to_resume(tmp_path, tiny_clip_dir) -> None:
    # Before: exit 2, but its partial output stayed, so a plain rerun asked for --resume/--restart.
    import gzip

    inp = _challenge(tmp_path).with_name("in.csv.gz")
    rows = "".join(f"images/red_circle.png,a red circle,{random.Random(i).randbytes(1500).hex()}\n" for i in range(300))
    data = gzip.compress(("url,caption,pad\n" + rows).encode())  # cut past the first read and commit
    inp.write_bytes(data[: len(data) // 2])
    for _ in range(2):
        code, err = _score_in_process(inp, tiny_clip_dir, "--commit-rows", "64")
        assert code == 2 and "is not a complete gzip file" in err, err
        assert not list(inp.parent.glob("*.partial")) and not inp.with_name("in_scored.csv.gz").exists()


# ------------------------------------------------------------------ issue 17: pipes and paths
def test_output_to_a_closed_pipe_ends_quietly(tmp_path, tiny_onnx_dir) -> None:
    # `similarity score in.csv -o - | head -2`. Before: a BrokenPipeError traceback.
    inp = _challenge(tmp_path).with_name("many.csv")
    inp.write_text("url,caption\n" + "".join(f"images/red_circle.png,caption {i}\n" for i in range(400)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "similarity",
            "score",
            str(inp),
            "-o",
            "-",
            "--model",
            str(tiny_onnx_dir),
            "--batch-size",
            "4",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "SIMILARITY_ALLOWED_NETWORKS": ""},
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = [proc.stdout.readline() for _ in range(2)]
    proc.stdout.close()  # what `head` does after two lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert head[0].startswith(b"url,caption,similarity") and b"caption 0" in head[1]
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_relative_image_paths_stdin_versus_file(tmp_path, tiny_onnx_dir) -> None:
    # A file's relative paths are relative to the file's folder; stdin's to the working directory.
    inp = _challenge(tmp_path)
    text = inp.read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "SIMILARITY_ALLOWED_NETWORKS": ""}
    cmd = [sys.executable, "-m", "similarity", "score"]
    from_file = subprocess.run([*cmd, str(inp), "-o", "-", "--model", str(tiny_onnx_dir), "--backend", "onnx"], capture_output=True,
                               text=True, cwd=elsewhere, env=env, timeout=120)  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(from_file.stdout)))
    assert rows[0]["error"] == ""  # images/ found beside the CSV although the cwd is elsewhere
    stdin_here = subprocess.run([*cmd, "-", "--model", str(tiny_onnx_dir), "--backend", "onnx"], input=text, capture_output=True,
                                text=True, cwd=inp.parent, env=env, timeout=120)  # fmt: skip
    assert list(csv.DictReader(io.StringIO(stdin_here.stdout)))[0]["error"] == ""
    stdin_elsewhere = subprocess.run([*cmd, "-", "--model", str(tiny_onnx_dir), "--backend", "onnx"], input=text, capture_output=True,
                                     text=True, cwd=elsewhere, env=env, timeout=120)  # fmt: skip
    assert list(csv.DictReader(io.StringIO(stdin_elsewhere.stdout)))[0]["error"].startswith("not_found")


# ------------------------------------------------------------------ issue 17: flags and variables
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--batch-size", "0"], {}, "--batch-size: Input should be greater than or equal to 1"),
        (["--batch-size", "-3"], {}, "--batch-size: Input should be greater than or equal to 1"),
        (["--timeout", "0"], {}, "--timeout: Input should be greater than 0"),
        (["--workers", "0"], {}, "--workers: Input should be greater than or equal to 1"),
        (["--commit-rows", "0"], {}, "--commit-rows: Input should be greater than or equal to 1"),
        (["--processes", "-1"], {}, "--processes: Input should be greater than or equal to 0"),
        ([], {"SIMILARITY_PROCESSES": "many"}, "SIMILARITY_PROCESSES: Input should be a valid integer"),
        ([], {"SIMILARITY_PIXELS": "gpu"}, "SIMILARITY_PIXELS: Input should be 'pillow', 'torch' or 'nvjpeg'"),
        ([], {"SIMILARITY_BATCH_SIZE": "abc"}, "SIMILARITY_BATCH_SIZE: Input should be a valid integer"),
        ([], {"SIMILARITY_FETCH_DEADLINE": "-1"}, "SIMILARITY_FETCH_DEADLINE: Input should be greater than 0"),
        ([], {"SIMILARITY_COMMIT_SECONDS": "x"}, "SIMILARITY_COMMIT_SECONDS: Input should be a valid number"),
        (["--only-errors", "timeout,nope"], {}, "--only-errors: unknown error code(s) nope"),
    ],
)
def test_bad_flags_and_variables_name_themselves(tmp_path, monkeypatch, capsys, args, env, message) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = main(["score", str(_challenge(tmp_path)), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


# ------------------------------------------------------------------ issue 17: model messages
def test_missing_model_hint_names_the_hf_cli(tmp_path, capsys) -> None:
    code = main(["score", str(_challenge(tmp_path)), "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 3 and "hf download openai/clip-vit-base-patch32" in err and "huggingface-cli" not in err


@pytest.mark.parametrize("broken", ["config.json", "preprocessor_config.json", "tokenizer.json"])
def test_corrupt_model_files_are_exit_3(tmp_path, tiny_onnx_dir, broken) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_onnx_dir, model)
    (model / broken).write_text('{"truncated": ')
    r = _run("score", str(_challenge(tmp_path)), "--model", str(model), "--backend", "onnx")
    assert r.returncode == 3, r.stderr
    assert broken in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ issue 17: when every row fails
def test_every_row_failing_is_exit_4_with_a_warning(tmp_path, tiny_onnx_dir, server) -> None:
    inp = tmp_path / "in.csv"
    dead = "http://127.0.0.1:9/x.png"  # discard port: connection refused
    inp.write_text(f"url,caption\n{dead},a\n{dead},b\n")
    r = _run("score", str(inp), "--model", str(tiny_onnx_dir), "--backend", "onnx", "--allow-network", "127.0.0.1/32", "--timeout", "3",
             env={"SIMILARITY_MAX_RETRIES": "0"})  # fmt: skip
    assert r.returncode == 4 and "warning: every row failed (connection_error 2)" in r.stderr, r.stderr
    assert len(_rows(tmp_path / "in_scored.csv")) == 2  # the output is still written


def test_fail_on_errors(tmp_path, tiny_clip_dir, capsys) -> None:
    inp = _challenge(tmp_path)
    assert main(["score", str(inp), "--model", str(tiny_clip_dir), "--restart"]) == 0
    assert main(["score", str(inp), "--model", str(tiny_clip_dir), "--fail-on-errors"]) == 4
    assert "2 rows have errors (--fail-on-errors)" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 17: progress and summary
def test_progress_shows_percent_and_the_model_line(tmp_path, tiny_onnx_dir) -> None:
    r = _run("score", str(_challenge(tmp_path)), "--model", str(tiny_onnx_dir), "--backend", "onnx", "--progress")
    assert r.returncode == 0, r.stderr
    assert "loading the model from" in r.stderr.splitlines()[0]
    assert "100%|" in r.stderr and "12 rows" in r.stderr  # bytes read against the size, rows written


def test_summary_fits_in_100_columns() -> None:
    from similarity.cli import summary_lines
    from similarity.pipeline.files import FileResult
    from similarity.types import ScoreStats

    errors = {code: i + 1 for i, code in enumerate(["connection_error", "timeout", "http_404", "http_503",
              "not_an_image", "decode_error", "too_large", "blocked_address", "s3_error", "missing_caption"])}  # fmt: skip
    stats = ScoreStats(rows=123456, scored=100000, errors=errors, truncated=12)
    lines = summary_lines(FileResult(stats, 3600.0, resumed_rows=5000, kept_rows=2), "out/x.csv")
    assert all(len(line) <= 100 for line in lines), lines
    assert lines[0].startswith("rows 123456: scored 100000, errors 23456 (missing_caption 10, s3_error 9")
    assert "more)" in lines[0] and lines[-1] == "-> out/x.csv"


def test_stdin_cannot_be_resumed(tmp_path, tiny_clip_dir, monkeypatch, capsys) -> None:
    from similarity.pipeline.commits import Partial
    from similarity.types import ScoreStats

    out = tmp_path / "o.csv"
    partial = Partial(tmp_path / "o.csv.partial")  # what a killed run from stdin leaves
    partial.start({"input": "-"}).write(b"url,caption,similarity,cosine,error,truncated\n")
    partial.commit(0, ScoreStats())
    partial.close()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"url,caption\nx.png,a\n")))
    code = main(["score", "-", "-o", str(out), "--resume", "--model", str(tiny_clip_dir)])
    assert code == 2 and "stdin cannot be resumed" in capsys.readouterr().err


# ------------------------------------------------------------------ the row contract's edges
@pytest.mark.parametrize("form", ["dot-slash", "absolute", "symlink"])
def test_output_that_is_the_input_under_another_name_is_refused(tmp_path, tiny_clip_dir, monkeypatch, form) -> None:
    # Before: only the same string was refused; `-o ./in.csv` overwrote the input, exit 0.
    inp = _challenge(tmp_path)
    before = inp.read_bytes()
    monkeypatch.chdir(inp.parent)
    name = {"dot-slash": "./challenge_set.csv", "absolute": str(inp)}.get(form, "link.csv")
    if form == "symlink":
        (inp.parent / "link.csv").symlink_to(inp)
    code, err = _score_in_process(Path("challenge_set.csv"), tiny_clip_dir, "-o", name)
    assert code == 2 and "is the input" in err, err
    assert inp.read_bytes() == before


@pytest.mark.parametrize("output", ["-", "out.txt"])
def test_unnamed_outputs_keep_the_input_format(tmp_path, tiny_clip_dir, output) -> None:
    # Before: stdout and names without a known extension were always CSV, whatever the input.
    inp = _challenge(tmp_path).with_name("in.jsonl")
    inp.write_text(json.dumps({"url": "images/red_circle.png", "caption": "a red circle"}) + "\n")
    r = _run("score", str(inp), "-o", output, "--model", str(tiny_clip_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout if output == "-" else (tmp_path / output).read_text()
    row = json.loads(text.splitlines()[0])
    assert row["caption"] == "a red circle" and row["error"] is None and 0 < row["similarity"] < 1


def test_a_pipe_named_as_the_input_is_read_like_stdin(tmp_path, tiny_clip_dir) -> None:
    # `similarity score <(zcat in.csv.gz) -o out.csv`. Before: "does not exist" (not a regular file).
    shutil.copytree(ROOT / "examples" / "images", tmp_path / "images")
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    text = "url,caption\nimages/red_circle.png,a red circle\nimages/missing.png,gone\n"
    feed = subprocess.Popen(["sh", "-c", f"printf '%s' '{text}' > {fifo}"])
    r = _run("score", str(fifo), "-o", "out.csv", "--model", str(tiny_clip_dir), cwd=tmp_path)
    feed.wait(timeout=30)
    assert r.returncode == 0, r.stderr
    rows = _rows(tmp_path / "out.csv")
    assert [x["url"] for x in rows] == ["images/red_circle.png", "images/missing.png"]
    assert rows[0]["error"] == "" and rows[1]["error"].startswith("not_found")  # relative to the cwd
    from similarity.pipeline.commits import Partial
    from similarity.types import ScoreStats

    partial = Partial(tmp_path / "out.csv.partial")
    partial.start({}).write(b"url,caption,similarity,cosine,error,truncated\n")
    partial.commit(0, ScoreStats())
    partial.close()
    feed = subprocess.Popen(["sh", "-c", f"printf '%s' '{text}' > {fifo}"])
    r = _run("score", str(fifo), "-o", "out.csv", "--resume", "--model", str(tiny_clip_dir), cwd=tmp_path)
    feed.kill()
    assert r.returncode == 2 and "(a pipe, not a file) cannot be resumed" in r.stderr, r.stderr
