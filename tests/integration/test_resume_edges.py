"""What an interrupted run can leave in its partial output, and ``--resume`` after each: the
output is the clean run's, every row once, the header included. In process, with the interrupt
raised at the exact point (a real signal cannot be aimed that precisely)."""

from __future__ import annotations

from pathlib import Path

import pytest

from similarity.fetch import Fetcher, FetchSettings
from similarity.io.sinks import TextSink
from similarity.pipeline.commits import Committer
from similarity.pipeline.files import partial_dir, score_file

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ["images/red_circle.png", "images/blue_square.png", "images/green_circle.png", "images/missing.png"]


@pytest.fixture(scope="module")
def local_fetcher():
    f = Fetcher(FetchSettings(allow_local_paths=True), base_dir=ROOT / "examples")
    yield f
    f.close()


def _input(tmp_path: Path, rows: int = 150) -> Path:
    inp = tmp_path / "in.csv"
    inp.write_text("id,url,caption\n" + "".join(f"{i},{IMAGES[i % 4]},caption {i % 5}\n" for i in range(rows)))
    return inp


def _score(inp: Path, out: Path, model, fetcher, on_partial: str = "resume") -> None:
    score_file(str(inp), str(out), model, fetcher, batch_size=4, workers=2, commit_rows=5, on_partial=on_partial)  # type: ignore[arg-type]


def _clean(tmp_path: Path, inp: Path, ext: str, model, fetcher) -> bytes:
    ref = tmp_path / f"clean.{ext}"
    _score(inp, ref, model, fetcher, "restart")
    return ref.read_bytes()


@pytest.mark.parametrize("ext", ["csv", "parquet"])
@pytest.mark.parametrize("left", ["no-commit", "torn-first-commit", "rows-gone"])
def test_resume_of_a_partial_with_nothing_to_continue_starts_over(tmp_path, tiny_model, local_fetcher, monkeypatch,
                                                                  ext, left) -> None:  # fmt: skip
    # Before: the rows file was cut to nothing and no header written (CSV without a header, exit 0;
    # Parquet "Expected IPC message of type schema"), or FileNotFoundError when rows was gone.
    inp, out = _input(tmp_path), tmp_path / f"out.{ext}"
    clean = _clean(tmp_path, inp, ext, tiny_model, local_fetcher)
    if left == "rows-gone":
        calls = {"n": 0}
        real_now = Committer.now

        def interrupt_later(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real_now(self, *args, **kwargs)

        monkeypatch.setattr(Committer, "now", interrupt_later)
    else:
        monkeypatch.setattr(Committer, "now", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _score(inp, out, tiny_model, local_fetcher, "restart")
    monkeypatch.undo()
    partial = partial_dir(str(out))
    if left == "torn-first-commit":
        (partial / "commits.jsonl").write_bytes(b'{"rows":0,"by')
    elif left == "rows-gone":
        assert (partial / "commits.jsonl").read_text().count("\n") >= 2
        (partial / "rows").unlink()
    _score(inp, out, tiny_model, local_fetcher)
    assert out.read_bytes() == clean and not partial.exists()


def test_an_interrupt_inside_a_row_write_commits_nothing_twice(
    tmp_path, tiny_model, local_fetcher, monkeypatch
) -> None:
    # Before: Ctrl-C after the sink took row 65 but before it was counted committed 64 rows with 65
    # rows' bytes, so the resumed output held that row twice.
    inp, out = _input(tmp_path), tmp_path / "out.csv"
    clean = _clean(tmp_path, inp, "csv", tiny_model, local_fetcher)
    real_write, calls = TextSink.write, {"n": 0}

    def write_then_interrupt(self, result) -> None:
        real_write(self, result)
        calls["n"] += 1
        if calls["n"] == 65:  # the scorer's window is 64 rows at batch size 4: a commit boundary
            raise KeyboardInterrupt

    monkeypatch.setattr(TextSink, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _score(inp, out, tiny_model, local_fetcher, "restart")
    monkeypatch.undo()
    _score(inp, out, tiny_model, local_fetcher)
    assert out.read_bytes() == clean
