"""The CLI with its embedding cache, run as users run it: real processes, the default local store in
a temporary user cache directory, and a loopback image server answering conditional requests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from support.conditional import ConditionalImages
from support.imageserver import png_bytes
from support.redis_server import free_port
from support.shapes import COLOURS, SHAPES, draw

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cache_home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32"}
    full.pop("SIMILARITY_CACHE", None)  # the CLI's own default: the local store
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "similarity", *args], capture_output=True, text=True, env=full, cwd=ROOT, timeout=300
    )


@pytest.fixture
def csv_in(tmp_path, server):
    images = ConditionalImages(server)
    rng = random.Random(3)
    lines = ["id,url,caption"]
    for i in range(8):
        c, s = list(COLOURS)[i % 4], SHAPES[i % 3]
        url = images.put(f"/cli-cache/{tmp_path.name}/{i}.png", png_bytes(draw(c, s, rng)))
        lines.append(f"{i},{url},a {c} {s}")
    lines.append(f"8,{server.status('/cli-cache/missing.png', 404)},a lost image")
    lines.append(f"9,{url},a caption seen once")
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, images


def test_second_run_is_byte_identical_and_only_revalidates(tmp_path, tiny_clip_dir, csv_in) -> None:
    inp, images = csv_in
    home = tmp_path / "home-cache"
    common = ["--model", str(tiny_clip_dir), "--backend", "torch", "--no-progress"]
    first = _run(
        "score",
        str(inp),
        "-o",
        str(tmp_path / "1.csv"),
        *common,
        "--summary-json",
        str(tmp_path / "1.json"),
        cache_home=home,
    )
    assert first.returncode == 0, first.stderr
    assert (home / "text-image-similarity" / "embeddings.sqlite3").is_file()
    assert images.statuses() == [200] * 8
    assert "cache sqlite:" in first.stderr and "cache hits/misses: images 0/8, URLs 0/8" in first.stderr
    images.reset_log()

    second = _run(
        "score",
        str(inp),
        "-o",
        str(tmp_path / "2.csv"),
        *common,
        "--summary-json",
        str(tmp_path / "2.json"),
        cache_home=home,
    )
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "2.csv").read_bytes() == (tmp_path / "1.csv").read_bytes()
    assert images.statuses() == [304] * 8 and all(s.if_none_match for s in images.log)
    summary = json.loads((tmp_path / "2.json").read_text())
    c = summary["cache"]
    assert (c["image_hits"], c["image_misses"], c["url_hits"], c["url_not_modified"]) == (8, 0, 8, 8)
    assert (c["caption_hits"], c["caption_misses"]) == (
        10,
        0,
    )  # the 404 row's caption too: encoded before its image failed
    assert summary["captions_encoded"] == 0 and summary["images_fetched"] == 0
    assert "images 8/0, URLs 8/0 (304: 8, within TTL: 0), captions 10/0" in second.stderr
    images.reset_log()

    third = _run("score", str(inp), "-o", str(tmp_path / "3.csv"), *common, "--cache-ttl", "3600", cache_home=home)
    assert third.returncode == 0, third.stderr
    assert images.log == []  # trusted within the TTL: not even a conditional request
    assert (tmp_path / "3.csv").read_bytes() == (tmp_path / "1.csv").read_bytes()

    stats = _run("cache", "stats", cache_home=home)
    assert stats.returncode == 0, stats.stderr
    st = json.loads(stats.stdout)
    assert st["entries"] == {"images": 8, "captions": 10, "urls": 8} and st["store"].startswith("sqlite:")
    cleared = _run("cache", "clear", cache_home=home)
    assert cleared.returncode == 0 and "cleared 26 entries" in cleared.stderr
    assert json.loads(_run("cache", "stats", cache_home=home).stdout)["total_entries"] == 0


def test_no_cache_neither_reads_nor_writes(tmp_path, tiny_clip_dir, csv_in) -> None:
    inp, images = csv_in
    home = tmp_path / "home-cache"
    r = _run("score", str(inp), "--model", str(tiny_clip_dir), "--backend", "torch", "--no-cache", cache_home=home)
    assert r.returncode == 0, r.stderr
    assert not home.exists() and "cache hits/misses" not in r.stderr
    assert images.statuses() == [200] * 8 and not any(s.if_none_match or s.if_modified_since for s in images.log)


def test_an_unreachable_redis_only_warns(tmp_path, tiny_clip_dir, csv_in) -> None:
    inp, _ = csv_in
    env = {"SIMILARITY_CACHE": f"redis://127.0.0.1:{free_port()}/0", "SIMILARITY_CACHE_TIMEOUT": "0.2"}
    r = _run("score", str(inp), "--model", str(tiny_clip_dir), "--backend", "torch", cache_home=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "embedding cache unavailable" in r.stderr and "store errors" in r.stderr and "Traceback" not in r.stderr
    assert "rows 10: scored 9" in r.stderr


def test_a_bad_cache_setting_is_named(tmp_path, tiny_clip_dir, csv_in) -> None:
    inp, _ = csv_in
    r = _run(
        "score", str(inp), "--model", str(tiny_clip_dir), cache_home=tmp_path, env={"SIMILARITY_CACHE": "memcached://x"}
    )
    assert r.returncode == 2 and "SIMILARITY_CACHE: Value error" in r.stderr
    off = _run("cache", "stats", cache_home=tmp_path, env={"SIMILARITY_CACHE": "off"})
    assert off.returncode == 2 and "the cache is off" in off.stderr
