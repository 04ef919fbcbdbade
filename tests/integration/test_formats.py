"""The row contract, run over every format: CSV, TSV, JSON Lines, Parquet, gzip-compressed CSV,
TSV and JSON Lines. The same rows scored through each format give the same rows out, in order,
with the same scores and errors; Parquet keeps the column types."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from similarity.fetch import Fetcher, FetchSettings
from similarity.pipeline.files import score_file

ROOT = Path(__file__).resolve().parents[2]
FORMATS = ["csv", "tsv", "jsonl", "parquet", "csv.gz", "tsv.gz", "jsonl.gz"]

#: (id, url, caption, note): a scored row, a missing image, empty and missing captions, unicode,
#: a caption with the delimiter, a quote and a newline in it, a repeated pair.
ROWS: list[tuple[int, str, str | None, str]] = [
    (1, "images/red_circle.png", "a red circle", "plain"),
    (2, "images/blue_square.png", "a blue square, tab\there", "delims"),
    (3, "images/missing.png", "not there", "missing image"),
    (4, "images/red_triangle.png", "", "empty caption"),
    (5, "images/green_circle.png", 'a "green"\ncircle ✓ 日本', "quote, newline, unicode"),
    (6, "images/red_circle.png", "a red circle", "repeat"),
    (7, "", "no url", "empty url"),
]


def write_input(path: Path, fmt: str, rows=ROWS) -> None:
    kind, _, gz = fmt.partition(".")
    if kind == "parquet":
        table = pa.table(
            {
                "id": pa.array([r[0] for r in rows], pa.int32()),
                "url": [r[1] for r in rows],
                "caption": [r[2] for r in rows],
                "note": [r[3] for r in rows],
            }
        )
        pq.write_table(table, path)
        return
    if kind == "jsonl":
        text = "".join(json.dumps({"id": r[0], "url": r[1], "caption": r[2], "note": r[3]}) + "\n\n" for r in rows)
    else:
        buf = io.StringIO(newline="")
        w = csv.writer(buf, delimiter="\t" if kind == "tsv" else ",")
        w.writerow(["id", "url", "caption", "note"])
        for r in rows:
            w.writerow(r)
            buf.write("\r\n")  # a blank line between rows: not a row
        text = buf.getvalue()
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)


def read_output(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Rows as dicts with the score columns normalised to Python values (None for empty)."""
    kind, _, gz = fmt.partition(".")
    if kind == "parquet":
        return pq.read_table(path).to_pylist()
    data = path.read_bytes()
    text = (gzip.decompress(data) if gz else data).decode("utf-8")
    if kind == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line]
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ","))
    for r in rows:
        r["similarity"] = float(r["similarity"]) if r["similarity"] else None
        r["cosine"] = float(r["cosine"]) if r["cosine"] else None
        r["error"] = r["error"] or None
        r["truncated"] = r["truncated"] == "true"
    return rows


@pytest.fixture(scope="module")
def local_fetcher():
    f = Fetcher(FetchSettings(allow_local_paths=True), base_dir=ROOT / "examples")
    yield f
    f.close()


@pytest.fixture(scope="module")
def scored(tiny_model, local_fetcher, tmp_path_factory) -> dict[str, tuple[list[dict[str, Any]], Any]]:
    out: dict[str, tuple[list[dict[str, Any]], Any]] = {}
    base = tmp_path_factory.mktemp("formats")
    for fmt in FORMATS:
        src, dst = base / f"in.{fmt}", base / f"out.{fmt}"
        write_input(src, fmt)
        result = score_file(str(src), str(dst), tiny_model, local_fetcher, batch_size=4, workers=2)
        out[fmt] = (read_output(dst, fmt), result)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_row_out_in_order_with_its_columns(scored, fmt) -> None:
    rows, result = scored[fmt]
    assert result.stats.rows == len(ROWS) == len(rows)
    assert [str(r["id"]) for r in rows] == [str(r[0]) for r in ROWS]
    assert [r["caption"] for r in rows] == [c if c is not None else "" for _, _, c, _ in ROWS]
    assert [r["note"] for r in rows] == [r[3] for r in ROWS]
    assert list(rows[0])[:8] == ["id", "url", "caption", "note", "similarity", "cosine", "error", "truncated"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_scores_and_errors_are_the_same_in_every_format(scored, fmt) -> None:
    rows, _ = scored[fmt]
    reference, _ = scored["csv"]
    for got, want in zip(rows, reference, strict=True):
        assert (got["similarity"], got["cosine"], got["truncated"]) == (
            want["similarity"],
            want["cosine"],
            want["truncated"],
        )
        assert (got["error"] or "").split(":")[0] == (want["error"] or "").split(":")[0]
    codes = [(r["error"] or "").split(":")[0] for r in rows]
    assert codes == ["", "", "not_found", "missing_caption", "", "", "missing_url"]
    assert rows[0]["similarity"] == rows[5]["similarity"] is not None  # the repeated pair


def test_parquet_keeps_column_types(scored) -> None:
    rows, _ = scored["parquet"]
    assert isinstance(rows[0]["id"], int) and isinstance(rows[0]["similarity"], float)
    assert rows[2]["similarity"] is None and rows[2]["error"].startswith("not_found")
    assert rows[0]["error"] is None and rows[0]["truncated"] is False


def test_parquet_schema(tiny_model, local_fetcher, tmp_path) -> None:
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(src, "parquet")
    score_file(str(src), str(dst), tiny_model, local_fetcher)
    schema = pq.read_schema(dst)
    assert schema.field("id").type == pa.int32()  # the input's type, kept
    assert schema.field("similarity").type == pa.float64() and schema.field("cosine").type == pa.float64()
    assert schema.field("error").type == pa.string() and schema.field("truncated").type == pa.bool_()
    assert "_extra" not in schema.names  # a Parquet input cannot have ragged rows
    # From CSV: the input columns are strings, and ragged rows have somewhere to keep their extras.
    write_input(tmp_path / "in.csv", "csv")
    score_file(str(tmp_path / "in.csv"), str(tmp_path / "from_csv.parquet"), tiny_model, local_fetcher)
    schema = pq.read_schema(tmp_path / "from_csv.parquet")
    assert schema.field("id").type == pa.string() and schema.names[-1] == "_extra"


@pytest.mark.parametrize("fmt_in", ["csv", "jsonl", "parquet", "tsv.gz"])
@pytest.mark.parametrize("fmt_out", ["csv", "jsonl", "parquet", "jsonl.gz"])
def test_any_format_to_any_format(tiny_model, local_fetcher, tmp_path, fmt_in, fmt_out) -> None:
    src, dst = tmp_path / f"in.{fmt_in}", tmp_path / f"out.{fmt_out}"
    write_input(src, fmt_in)
    score_file(str(src), str(dst), tiny_model, local_fetcher, batch_size=4, workers=2)
    rows = read_output(dst, fmt_out)
    assert [str(r["id"]) for r in rows] == [str(r[0]) for r in ROWS]
    assert [(r["error"] or "").split(":")[0] for r in rows][2:4] == ["not_found", "missing_caption"]


def test_ragged_rows_keep_their_extra_fields_in_every_output(tiny_model, local_fetcher, tmp_path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("url,caption\nimages/red_circle.png,a red circle,EXTRA,MORE\nimages/red_circle.png,ok\n")
    for fmt in ("csv", "jsonl", "parquet"):
        dst = tmp_path / f"out.{fmt}"
        score_file(str(src), str(dst), tiny_model, local_fetcher)
        rows = read_output(dst, fmt)
        assert rows[0]["error"].startswith("ragged_row") and rows[1]["error"] is None
        if fmt == "csv":
            raw = list(csv.reader(dst.open(newline="")))
            assert raw[1][-2:] == ["EXTRA", "MORE"]
        elif fmt == "jsonl":
            assert rows[0]["_extra"] == ["EXTRA", "MORE"]
        else:
            assert json.loads(rows[0]["_extra"]) == ["EXTRA", "MORE"] and rows[1]["_extra"] is None


def test_jsonl_keys_beyond_the_first_object(tiny_model, local_fetcher, tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [
        {"url": "images/red_circle.png", "caption": "a red circle"},
        {"url": "images/red_circle.png", "caption": "a red circle", "tag": "later"},
        {"caption": "no url key"},
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    score_file(str(src), str(tmp_path / "out.jsonl"), tiny_model, local_fetcher)
    rows = read_output(tmp_path / "out.jsonl", "jsonl")
    assert rows[1]["tag"] == "later" and rows[1]["error"] is None  # JSON Lines out: any keys are kept
    assert rows[2]["url"] is None and rows[2]["error"].startswith("missing_url")
    score_file(str(src), str(tmp_path / "out.csv"), tiny_model, local_fetcher)
    rows = read_output(tmp_path / "out.csv", "csv")
    assert rows[1]["error"].startswith("ragged_row: keys tag")  # fixed columns: nothing silently dropped


def test_gzip_output_is_a_real_gzip_stream(tiny_model, local_fetcher, tmp_path) -> None:
    shutil.copy(ROOT / "examples" / "challenge_set.csv", tmp_path / "c.csv")
    score_file(str(tmp_path / "c.csv"), str(tmp_path / "c.csv.gz"), tiny_model, local_fetcher)
    score_file(str(tmp_path / "c.csv"), str(tmp_path / "c_plain.csv"), tiny_model, local_fetcher)
    assert gzip.decompress((tmp_path / "c.csv.gz").read_bytes()) == (tmp_path / "c_plain.csv").read_bytes()


# ------------------------------------------------------------------ S3, and what the batch pipeline reads
def test_s3_input_and_output_in_every_format(tiny_model, s3, bucket, tmp_path, monkeypatch) -> None:
    from similarity.fetch import Fetcher, FetchSettings

    monkeypatch.chdir(tmp_path)  # where an S3 output's partial directory lives
    for i, name in enumerate(["red_circle", "blue_square"]):
        s3.put_object(
            Bucket=bucket, Key=f"img/{i}.png", Body=(ROOT / "examples" / "images" / f"{name}.png").read_bytes()
        )
    rows = [(0, f"s3://{bucket}/img/0.png", "a red circle", "x"), (1, f"s3://{bucket}/img/9.png", "gone", "y")]
    fetcher = Fetcher(FetchSettings(), s3_client=s3)
    try:
        for fmt in ("csv.gz", "jsonl", "parquet"):
            local = tmp_path / f"in.{fmt}"
            write_input(local, fmt, rows)
            s3.put_object(Bucket=bucket, Key=f"in/data.{fmt}", Body=local.read_bytes())
            score_file(f"s3://{bucket}/in/data.{fmt}", f"s3://{bucket}/out/data.{fmt}", tiny_model, fetcher, s3)
            (tmp_path / f"got.{fmt}").write_bytes(s3.get_object(Bucket=bucket, Key=f"out/data.{fmt}")["Body"].read())
            got = read_output(tmp_path / f"got.{fmt}", fmt)
            assert [(r["error"] or "").split(":")[0] for r in got] == ["", "not_found"], fmt
            assert got[0]["similarity"] is not None
    finally:
        fetcher.close()
    assert not list(tmp_path.glob(".similarity-partial/*"))


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ("url,caption\nu,caf\xe9\n".encode("latin-1"), "InputEncodingError", "not valid utf-8 at byte 17"),
        ("url,caption\nu,ok\n".encode("utf-16-le"), "InputEncodingError", "UTF-16 without a byte-order mark"),
        (b'url,caption\nu,"open\nv,w\n', "MalformedCsv", "never closed"),
    ],
)
def test_batch_splitter_raises_a_named_run_error_for_bad_s3_files(s3, bucket, body, error, message) -> None:
    # issue 22 A4/B5: a malformed file dropped into incoming/ must fail its job with the reason; the
    # job service fails a job on any RunError, so the reader's errors must be RunErrors, named.
    from similarity import errors
    from similarity.io.chunking import split_csv
    from similarity.io.streams import open_input

    s3.put_object(Bucket=bucket, Key="incoming/bad.csv", Body=body)
    with (
        pytest.raises(getattr(errors, error), match=message) as caught,
        open_input(f"s3://{bucket}/incoming/bad.csv", s3) as stream,
    ):
        _, chunks = split_csv(stream, 100)
        list(chunks)
    assert isinstance(caught.value, errors.RunError)


def test_nan_and_infinity_are_null_in_json_lines(tiny_model, local_fetcher, tmp_path) -> None:
    # Before: ValueError ("Out of range float values") after scoring; JSON has no spelling for them.
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"url":"images/red_circle.png","caption":"a red circle","w":NaN,"v":[1.5,-Infinity]}\n'
        '{"url":"images/blue_square.png","caption":"a blue square","w":1.5}\n'
    )
    pq.write_table(pa.table({"url": ["images/red_circle.png"], "caption": ["a red circle"], "w": [float("nan")],
                             "v": [[float("inf"), 2.0]]}), tmp_path / "in.parquet")  # fmt: skip
    for name in ("in.jsonl", "in.parquet"):
        score_file(str(tmp_path / name), str(tmp_path / "out.jsonl"), tiny_model, local_fetcher)
        rows = read_output(tmp_path / "out.jsonl", "jsonl")
        assert rows[0]["w"] is None and rows[0]["v"][0 if name == "in.parquet" else 1] is None
        assert all(r["error"] is None and r["similarity"] is not None for r in rows)
        assert len(rows) == (2 if name == "in.jsonl" else 1)


@pytest.mark.parametrize("fmt_out", ["csv", "jsonl", "parquet"])
def test_a_lone_surrogate_costs_only_its_row_in_every_output(tiny_model, local_fetcher, tmp_path, fmt_out) -> None:
    # Before: the row said invalid_caption, then writing it raised UnicodeEncodeError.
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"url":"images/red_circle.png","caption":"bad \\ud800 cap"}\n'
        '{"url":"images/blue_square.png","caption":"a blue square"}\n'
    )
    score_file(str(src), str(tmp_path / f"out.{fmt_out}"), tiny_model, local_fetcher)
    rows = read_output(tmp_path / f"out.{fmt_out}", fmt_out)
    assert rows[0]["caption"] == "bad \ufffd cap" and rows[0]["error"].startswith("invalid_caption")
    assert rows[1]["error"] is None and rows[1]["similarity"] is not None


def test_dictionary_encoded_parquet_columns(tiny_model, local_fetcher, tmp_path) -> None:
    # pandas' Categorical. Before: every row scored, then ArrowInvalid writing the Parquet file.
    table = pa.table({"url": pa.array(["images/red_circle.png"] * 2).dictionary_encode(),
                      "caption": ["a red circle", "a blue square"],
                      "tag": pa.array(["x", "y"]).dictionary_encode()})  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet")
    for fmt_out in ("parquet", "csv"):
        score_file(str(tmp_path / "in.parquet"), str(tmp_path / f"out.{fmt_out}"), tiny_model, local_fetcher)
        rows = read_output(tmp_path / f"out.{fmt_out}", fmt_out)
        assert [r["tag"] for r in rows] == ["x", "y"] and all(r["similarity"] is not None for r in rows)
    assert pq.read_schema(tmp_path / "out.parquet").field("tag").type == pa.string()
