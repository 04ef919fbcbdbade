"""``--only-errors``: rescore the rows of a previous output that failed with given codes; the
other rows are kept as they were, byte for byte, and are not fetched again."""

from __future__ import annotations

import csv
import io
import json
import random
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from similarity.cli import main
from support.imageserver import png_bytes
from support.shapes import draw


def _input(tmp_path, server, tag: str):
    ok = [server.image(f"/only/{tag}/ok{i}.png", png_bytes(draw("red", "circle", random.Random(i)))) for i in range(4)]
    flaky = [
        server.fail_then_serve(f"/only/{tag}/flaky{i}.png", png_bytes(draw("blue", "square", random.Random(i))), 503)
        for i in range(3)
    ]
    gone = server.status(f"/only/{tag}/gone.png", 404)
    rows = [(ok[0], "a red circle"), (flaky[0], "a blue square"), (gone, "gone"), (ok[1], "a red circle"),
            (flaky[1], "a blue square"), (ok[2], ""), (flaky[2], "a blue square"), (ok[3], "a red circle")]  # fmt: skip
    inp = tmp_path / "in.csv"
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "url", "caption"])
    w.writerows((i, u, c) for i, (u, c) in enumerate(rows))
    inp.write_text(buf.getvalue())
    return inp, ok, flaky


ARGS = ["--allow-network", "127.0.0.1/32", "--no-progress"]


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_only_errors_rescores_just_those_rows(tmp_path, server, tiny_clip_dir, monkeypatch, ext) -> None:
    monkeypatch.setenv("SIMILARITY_MAX_RETRIES", "0")  # the first 503 sticks in the first run
    inp, ok, flaky = _input(tmp_path, server, f"{ext}-{tmp_path.name}")
    first = tmp_path / f"first.{ext}"
    assert main(["score", str(inp), "-o", str(first), "--model", str(tiny_clip_dir), *ARGS]) == 0
    hits = {u: server.hits[urlsplit(u).path] for u in ok}
    second = tmp_path / f"second.{ext}"
    code = main(["score", str(first), "-o", str(second), "--only-errors", "http_5xx,timeout", "--model",
                 str(tiny_clip_dir), *ARGS])  # fmt: skip
    assert code == 0
    before, after = _read(first, ext), _read(second, ext)
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert [(r["error"] or "").split(":")[0] for r in before] == ["", "http_503", "http_404", "", "http_503",
                                                                    "missing_caption", "http_503", ""]  # fmt: skip
    assert [(r["error"] or "").split(":")[0] for r in after] == ["", "", "http_404", "", "", "missing_caption", "",
                                                                   ""]  # fmt: skip
    assert all(after[i]["similarity"] is not None for i in (1, 4, 6))
    for i in (0, 2, 3, 5, 7):  # kept exactly as they were
        assert after[i] == before[i]
    for u in ok:  # the kept rows were not fetched again
        assert server.hits[urlsplit(u).path] == hits[u]
    if ext == "csv":  # the kept rows' bytes are the previous output's bytes
        b, a = first.read_text().splitlines(), second.read_text().splitlines()
        assert [a[i + 1] for i in (0, 2, 3, 5, 7)] == [b[i + 1] for i in (0, 2, 3, 5, 7)]
    if ext == "parquet":
        assert pq.read_schema(second) == pq.read_schema(first)


def _read(path, ext):
    if ext == "parquet":
        return [{**r, "id": str(r["id"])} for r in pq.read_table(path).to_pylist()]
    if ext == "jsonl":
        return [{**r, "id": str(r["id"])} for r in map(json.loads, path.read_text().splitlines())]
    rows = list(csv.DictReader(path.open(newline="")))
    for r in rows:
        r["similarity"] = r["similarity"] or None
        r["error"] = r["error"] or None
    return rows


def test_only_errors_needs_a_previous_output(tmp_path, tiny_clip_dir, capsys) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("url,caption\nx.png,a\n")
    assert main(["score", str(inp), "--only-errors", "timeout", "--model", str(tiny_clip_dir)]) == 2
    assert "--only-errors reads a previous output" in capsys.readouterr().err


def test_excel_safe_applies_to_kept_rows_too(tmp_path, tiny_clip_dir, monkeypatch) -> None:
    # Before: only the rescored rows were escaped; a kept row's formula stayed live.
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "images", tmp_path / "images")
    inp = tmp_path / "in.csv"
    inp.write_text('note,url,caption\n"=HYPERLINK(""x"")",images/red_circle.png,a red circle\n'
                   "=1+1,images/missing.png,gone\n")  # fmt: skip
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    assert main(["score", str(inp), "-o", str(first), "--model", str(tiny_clip_dir), "--no-progress"]) == 0
    code = main(["score", str(first), "-o", str(second), "--only-errors", "not_found", "--excel-safe", "--model",
                 str(tiny_clip_dir), "--no-progress"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(second.open(newline="")))
    assert [r["note"] for r in rows] == ['\'=HYPERLINK("x")', "'=1+1"]
    assert rows[0]["similarity"] == list(csv.DictReader(first.open(newline="")))[0]["similarity"]
    assert not rows[0]["cosine"].startswith("'")  # the scores are numbers, never escaped


def test_excel_safe_rescoring_scores_the_caption_without_its_escape(tmp_path, tiny_clip_dir) -> None:
    # Before: a rescored caption "-a red circle", kept as "'-a red circle", was scored with the "'".
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "images", tmp_path / "images")
    (tmp_path / "in.csv").write_text(
        "url,caption\nimages/red_circle.png,-a red circle\nimages/gone.png,-a red circle\n"
    )
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    args = ["--model", str(tiny_clip_dir), "--no-progress", "--excel-safe"]
    assert main(["score", str(tmp_path / "in.csv"), "-o", str(first), *args]) == 0
    shutil.copy(tmp_path / "images" / "red_circle.png", tmp_path / "images" / "gone.png")  # it is back
    assert main(["score", str(first), "-o", str(second), "--only-errors", "not_found", *args]) == 0
    rows = list(csv.DictReader(second.open(newline="")))
    assert [r["caption"] for r in rows] == ["'-a red circle"] * 2 and rows[1]["error"] == ""
    assert rows[1]["similarity"] == rows[0]["similarity"]  # the same image and caption: the same score
