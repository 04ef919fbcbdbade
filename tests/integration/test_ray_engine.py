"""The Ray adapter on a real local Ray (num_cpus=2), started only through
``similarity.engines.local.local_ray`` (loopback only, no cloud-metadata probe): the CLI's rows,
scores and error codes for the same hostile CSV, one model per actor, poison images contained to
their rows, and every socket of every Ray process on loopback. One ray.init for the module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from similarity.engines.local import local_ray  # first: it sets Ray's environment before ray is imported

pytest.importorskip("ray.data", reason="the [ray] extra is not installed")

from similarity.engines.ray import score_dataset
from similarity.errors import NoUrlColumn
from support.engines import (
    ENGINE_SETTINGS,
    HEADER,
    assert_same_scores,
    cli_scores,
    descendants,
    frame_scores,
    hostile_rows,
    load_records,
    off_loopback,
    pids_mentioning,
    sockets_of,
    write_csv,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ray-engine")
    return {"dir": d, "loads": d / "loads"}


@pytest.fixture(scope="module")
def ray_info(work):
    with local_ray(2, env={"SIMILARITY_ENGINE_LOAD_LOG": str(work["loads"])}) as info:
        yield info


@pytest.fixture(scope="module")
def hostile(work, server, forbidden_server, tiny_clip_dir):
    h = hostile_rows(server, forbidden_server)
    path = write_csv(work["dir"] / "hostile.csv", h.rows)
    return {"hostile": h, "path": path, "cli": cli_scores(path, tiny_clip_dir, work["dir"] / "cli.csv")}


def read_hostile(path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    return ray.data.read_csv(
        str(path),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in HEADER}),
    )


@pytest.fixture(scope="module")
def scored(ray_info, hostile, tiny_clip_dir):
    # Half a CPU per actor leaves a CPU for the read and repartition tasks (two whole-CPU actors
    # on a two-CPU node would starve them).
    ds = read_hostile(hostile["path"]).repartition(4)
    out = score_dataset(ds, tiny_clip_dir, concurrency=2, num_cpus=0.5, rows_per_call=8, **ENGINE_SETTINGS)
    return out.to_pandas()


def test_same_rows_scores_and_error_codes_as_cli(scored, hostile) -> None:
    assert list(scored.columns) == [*HEADER, "similarity", "cosine", "error", "truncated"]
    assert len(scored) == len(hostile["hostile"].rows)
    got = frame_scores(scored)
    assert_same_scores(got, hostile["cli"])
    assert hostile["hostile"].expected_codes <= {s.code for s in got.values()}
    by_id = {str(r["id"]): r for r in scored.to_dict("records")}
    assert all(by_id[row[0]]["note"] == row[3] for row in hostile["hostile"].rows)


def test_poison_images_leave_the_other_rows_scored(scored, hostile) -> None:
    got = frame_scores(scored)
    poison = {got[i].code for i in hostile["hostile"].poison_ids}
    assert poison == {"too_many_pixels", "decode_error", "too_large"}
    good = [got[r[0]] for r in hostile["hostile"].rows if r[3] == "good"]
    assert all(g.similarity is not None and not g.error for g in good)


def test_model_loaded_once_per_actor(scored, work) -> None:
    recs = load_records(work["loads"])
    # Nine calls of 8 rows or fewer went to a pool of two actors (the second may still have been
    # starting when the first had done them all): one load per actor, never one per call.
    assert 1 <= len(recs) <= 2
    assert len({r["pid"] for r in recs}) == len(recs)


def test_columns_checked_before_running(ray_info, tiny_clip_dir) -> None:
    import pandas as pd
    import ray.data

    ds = ray.data.from_pandas(pd.DataFrame({"link": ["x"], "caption": ["c"]}))
    with pytest.raises(NoUrlColumn, match="'url'"):
        score_dataset(ds, tiny_clip_dir)


def test_the_score_columns_have_one_type_in_every_block(ray_info, tiny_clip_dir, tmp_path) -> None:
    # Before: a block whose rows all scored had error: null, one whose rows all failed null scores;
    # Parquet written from them did not read back as one table.
    import base64
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(buf, "PNG")
    red = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    good = pa.table({"id": [1, 2], "url": [red, red], "caption": ["a red circle", "a blue square"]})
    bad = pa.table({"id": [3, 4], "url": [None, "data:image/png,xx"], "caption": ["x", "y"]})
    out = score_dataset(ray.data.from_arrow([good, bad]), tiny_clip_dir, concurrency=1, num_cpus=0.5,
                        rows_per_call=2, **ENGINE_SETTINGS).materialize()  # fmt: skip
    types = {f.name: f.type for f in out.schema().base_schema}
    assert [types[c] for c in ("similarity", "cosine", "error", "truncated")] == [
        pa.float64(), pa.float64(), pa.string(), pa.bool_()]  # fmt: skip
    out.write_parquet(str(tmp_path))
    table = pq.read_table(tmp_path)
    assert sorted(table.column("id").to_pylist()) == [1, 2, 3, 4] and table.num_rows == 4


def test_every_ray_socket_is_on_loopback(ray_info, scored) -> None:
    session = ray_info["session_dir"]
    pids = descendants(os.getpid()) | pids_mentioning(session)
    socks = sockets_of(pids)
    assert any(s.listening and s.pid != os.getpid() for s in socks)  # Ray's own listeners are seen
    assert off_loopback(socks) == []


def test_ray_script_csv_to_parquet(ray_info, hostile, tiny_clip_dir, work) -> None:
    """examples/ray_score.py on this module's Ray."""
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import ray_score

    rows = [r for r in hostile["hostile"].rows if r[3] != "bad"]  # good and poison: no slow rows
    src = write_csv(work["dir"] / "script.csv", rows)
    out = work["dir"] / "scored"
    args = ray_score.parse(
        [str(src), str(out), "--model", str(tiny_clip_dir), "--concurrency", "1", "--num-cpus", "0.5"]
        + ["--allow-network", "127.0.0.1/32"]
    )
    assert ray_score.run(args) == 0
    got = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("*.parquet")))
    assert sorted(str(i) for i in got["id"]) == sorted(r[0] for r in rows)
    good = got[got["note"] == "good"]
    assert good["error"].isna().all() and good["similarity"].notna().all()


def test_gpu_actors_run_on_cuda_and_cpu_actors_use_their_cpus(tiny_clip_dir) -> None:
    """What each actor is told (no GPU here to run it): CUDA with a GPU, whose auto dtype is fp16."""
    from similarity.engines.ray import actor_spec
    from similarity.model import resolve

    common = {"url_col": "url", "caption_col": "caption", "batch_size": 32, "workers": 16}
    gpu = actor_spec(tiny_clip_dir, num_gpus=1, num_cpus=2, **common).resolved().model
    assert (gpu.device, gpu.dtype, gpu.threads) == ("cuda", "auto", 2)
    assert resolve(gpu.backend, "cuda", Path(gpu.dir), gpu.dtype).dtype == "fp16"
    cpu = actor_spec(tiny_clip_dir, num_gpus=0, num_cpus=0.5, dtype="fp32", **common).resolved().model
    assert (cpu.device, cpu.dtype, cpu.threads) == ("auto", "fp32", 1)
