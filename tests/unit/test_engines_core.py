"""The code every engine adapter shares, without an engine: settings resolved on the driver, one
model per process and spec, pandas batches through the scorer (order, empty batches, nulls,
de-duplication), and models unpacked once per node. Images are data: URIs (no sockets here)."""

from __future__ import annotations

import base64
import json
import multiprocessing
import random
import zipfile
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas", reason="the engine extras are not installed")

from similarity import Record, score_pairs  # noqa: E402
from similarity.engines import core  # noqa: E402
from similarity.engines.core import (  # noqa: E402
    ColumnConflict,
    JobSpec,
    ModelCache,
    cell_text,
    check_columns,
    new_scorer,
    score_frames,
)
from similarity.engines.models import (  # noqa: E402
    COMPLETE,
    extract_model_zip,
    from_import_directory,
    install_once,
)
from similarity.errors import ConfigError, ModelNotFound, NoCaptionColumn, NoUrlColumn  # noqa: E402
from support.imageserver import png_bytes  # noqa: E402
from support.shapes import draw  # noqa: E402


def data_uri(colour: str, shape: str, seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(draw(colour, shape, random.Random(seed)))).decode()


@pytest.fixture(scope="module")
def spec(tiny_clip_dir) -> JobSpec:
    return JobSpec.make(tiny_clip_dir, settings={"backend": "torch"}, base=core.Settings())


@pytest.fixture(scope="module")
def frames() -> list:
    red, blue = data_uri("red", "circle", 1), data_uri("blue", "square", 2)
    rows = [
        (1, red, "a red circle"),
        (2, red, "a blue square"),
        (3, blue, "a blue square"),
        (4, None, "a red circle"),
        (5, blue, float("nan")),
        (6, "data:image/png,plain", "x"),
        (7, red, "x" * (130 * 1024)),
        (8, blue, "a red circle"),
    ]
    df = pd.DataFrame(rows, columns=["id", "url", "caption"])
    # Empty batches first, between and last; the rest split unevenly.
    return [df.iloc[:0], df.iloc[0:3], df.iloc[3:3], df.iloc[3:4], df.iloc[4:8], df.iloc[8:]]


def test_batches_come_back_in_order_with_the_libraries_scores(spec, frames) -> None:
    runtime = core.runtime_for(spec)
    scorer = new_scorer(runtime)
    out = list(score_frames(iter(frames), spec, scorer=scorer))
    assert [len(f) for f in out] == [len(f) for f in frames]
    assert all(list(o.index) == list(f.index) for o, f in zip(out, frames))
    whole = pd.concat(out)
    assert list(whole.columns) == ["id", "url", "caption", "similarity", "cosine", "error", "truncated"]
    records = [Record(cell_text(u), cell_text(c)) for u, c in zip(whole["url"], whole["caption"])]
    want = list(score_pairs(records, runtime.model, runtime.fetcher))
    for (_, row), ref in zip(whole.iterrows(), want):
        if row["id"] == 7:  # the CLI's field limit, which score_pairs alone does not apply
            assert row["error"].startswith("field_too_large: 'caption' has 133120 characters")
            continue
        assert (row["error"] or None) == (ref.error_text or None)
        assert (pd.isna(row["similarity"]) and ref.similarity is None) or row["similarity"] == ref.similarity
    errors = dict(zip(whole["id"], whole["error"]))
    assert errors[4].startswith("missing_url") and errors[5].startswith("missing_caption")
    assert errors[6].startswith("invalid_data_uri")
    assert whole["similarity"].isna().sum() == 4 and whole["truncated"].dtype == bool
    # Two pictures, repeated across batches: each fetched and embedded once.
    assert scorer.stats.images_embedded == 2


def test_cells_become_text_or_null() -> None:
    assert [cell_text(v) for v in (None, float("nan"), pd.NA, "a", b"b\xff", 7)] == [
        None,
        None,
        None,
        "a",
        "b\ufffd",
        "7",
    ]


def test_settings_are_resolved_on_the_driver(tiny_clip_dir, monkeypatch) -> None:
    monkeypatch.setenv("SIMILARITY_FETCH_DEADLINE", "7")
    monkeypatch.setenv("SIMILARITY_PER_HOST", "3")
    spec = JobSpec.make(tiny_clip_dir, batch_size=8, settings={"per_host": 5, "allowed_networks": ["10.0.0.0/8"]})
    monkeypatch.setenv("SIMILARITY_FETCH_DEADLINE", "99")  # a worker's own environment does not count
    s = spec.resolved()
    assert (s.fetch.deadline, s.fetch.per_host, s.fetch.allowed_networks) == (7.0, 5, ("10.0.0.0/8",))
    assert s.score.batch_size == 8 and s.model.dir == str(Path(tiny_clip_dir).resolve())
    assert JobSpec.make("s3://b/m/").model_source == "s3://b/m/"  # remote sources are kept as given


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deadline": 0}, "keyword deadline: Input should be greater than 0"),
        ({"allowed_networks": "10.0.0.0/99"}, "keyword allowed_networks"),
        ({"timeout": 3}, "unknown setting timeout"),
        ({"excel_safe": True}, "unknown setting excel_safe"),
        ({"cache": "memcached://x"}, "keyword cache: Value error, must be off, local"),
        ({"batch_size_": 1}, "unknown setting batch_size_"),
    ],
)
def test_bad_settings_name_the_keyword(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        JobSpec.make("m", settings=kwargs)


def test_embedding_cache_is_used_when_asked_for(spec, tiny_clip_dir, tmp_path, frames) -> None:
    """``cache=`` (or SIMILARITY_CACHE on the driver) gives every worker the library's cache."""
    cached = JobSpec.make(
        tiny_clip_dir, settings={"backend": "torch", "cache": f"sqlite:///{tmp_path}/c.db"}, base=core.Settings()
    )
    cache = ModelCache()
    try:
        runtime = cache.get(cached)
        assert runtime.cache is not None and core.ModelCache().get(spec).cache is None
        first, again = new_scorer(runtime), new_scorer(runtime)
        a = pd.concat(score_frames(iter(frames), cached, scorer=first))
        b = pd.concat(score_frames(iter(frames), cached, scorer=again))
        assert first.stats.images_embedded == 2 and again.stats.images_embedded == 0  # the second run hits
        assert a["similarity"].equals(b["similarity"])
    finally:
        cache.clear()


def test_columns_are_checked() -> None:
    check_columns(["url", "caption", "x"], "url", "caption")
    with pytest.raises(NoUrlColumn):
        check_columns(["image", "caption"], "url", "caption")
    with pytest.raises(NoCaptionColumn):
        check_columns(["url", "text"], "url", "caption")
    with pytest.raises(ColumnConflict, match="'similarity'"):
        check_columns(["url", "caption", "similarity"], "url", "caption")
    with pytest.raises(ColumnConflict, match="'Error'"):  # before: accepted; Spark then could not select error
        check_columns(["url", "caption", "Error"], "url", "caption")


def test_one_model_per_process_and_spec(tiny_clip_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SIMILARITY_ENGINE_LOAD_LOG", str(tmp_path / "loads"))
    cache = ModelCache()
    a = JobSpec.make(tiny_clip_dir, settings={"backend": "torch"}, base=core.Settings())
    b = JobSpec.make(tiny_clip_dir, settings={"backend": "torch", "deadline": 3}, base=core.Settings())
    assert cache.get(a) is cache.get(a)
    assert cache.get(b) is not cache.get(a)
    records = [json.loads(p.read_text()) for p in (tmp_path / "loads").glob("load-*.json")]
    assert cache.loads == len(records) == 2
    assert {r["backend"] for r in records} == {"torch"} and all(not r["copied"] for r in records)
    cache.clear()


def test_missing_model_is_a_model_error(tmp_path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        ModelCache().get(JobSpec.make(tmp_path / "none", base=core.Settings()))


# ------------------------------------------------------------------------------------- models
def _zip(path: Path, src: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in src.iterdir():
            zf.write(f, prefix + f.name)
    return path


def test_zip_in_import_directory_unpacked_once(tiny_clip_dir, tmp_path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    _zip(imports / "tiny-clip.zip", Path(tiny_clip_dir), prefix="tiny-clip/")  # one top folder
    first = from_import_directory("tiny-clip.zip", tmp_path / "cache", imports)
    again = from_import_directory("tiny-clip.zip", tmp_path / "cache", imports)
    assert first.copied and not again.copied and first.path == again.path
    assert (first.path / "model.safetensors").is_file() and (first.path / COMPLETE).is_file()


def test_import_directory_folders_and_loose_files(tiny_clip_dir, tmp_path) -> None:
    assert from_import_directory("", tmp_path, Path(tiny_clip_dir)).path == Path(tiny_clip_dir)
    with pytest.raises(ModelNotFound, match="not a folder or zip"):
        from_import_directory("none.zip", tmp_path, Path(tiny_clip_dir))
    with pytest.raises(ModelNotFound, match="import directory"):
        from_import_directory("m.zip", tmp_path)  # outside Snowflake


def test_unsafe_zip_is_refused(tmp_path) -> None:
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ModelNotFound, match="unsafe"):
        extract_model_zip(tmp_path / "evil.zip", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_half_made_copy_is_made_again(tiny_clip_dir, tmp_path) -> None:
    import shutil

    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # a process died before the marker
    assert install_once(target, lambda d: shutil.copytree(tiny_clip_dir, d, dirs_exist_ok=True))
    assert (target / "model.safetensors").is_file()
    assert not install_once(target, lambda d: pytest.fail("copied twice"))


def test_incomplete_model_is_not_installed(tmp_path) -> None:
    with pytest.raises(Exception, match="lacks"):
        install_once(tmp_path / "m", lambda d: (d / "config.json").write_text("{}"))
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.staging-*"))


def _race(args: tuple[str, str, str]) -> bool:
    import shutil
    import time

    target, src, log = args

    def fill(d: Path) -> None:
        time.sleep(0.3)  # hold the lock while the other processes arrive
        shutil.copytree(src, d, dirs_exist_ok=True)

    return install_once(Path(target), fill)


def test_concurrent_processes_copy_once(tiny_clip_dir, tmp_path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        made = pool.map(_race, [(str(tmp_path / "m"), str(tiny_clip_dir), "")] * 3)
    assert sorted(made) == [False, False, True]
