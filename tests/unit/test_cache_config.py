"""The cache's settings: SIMILARITY_CACHE and friends, the CLI's flags over them, and what each
entry point gets from bootstrap.build."""

from __future__ import annotations

import logging

import pytest

from similarity.bootstrap import build
from similarity.cache.factory import DB_FILE, default_dir
from similarity.cli import _parser, settings_from
from similarity.config import ServiceSettings, Settings, load
from similarity.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "store"),
    [
        ("off", "off"),
        ("0", "off"),
        ("None", "off"),
        ("local", "local"),
        ("on", "local"),
        ("1", "local"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        (" rediss://user:pw@cache:6380 ", "rediss://user:pw@cache:6380"),
        ("REDIS://cache:6379/0", "redis://cache:6379/0"),  # before: accepted, then no store matched it
    ],
)
def test_similarity_cache_values(monkeypatch, value, store) -> None:
    monkeypatch.setenv("SIMILARITY_CACHE", value)
    assert load(Settings).cache.store == store


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SIMILARITY_CACHE", "memcached://x", "SIMILARITY_CACHE: Value error, must be off, local, sqlite:///PATH"),
        (
            "SIMILARITY_CACHE",
            "redis://cache:abc",
            "SIMILARITY_CACHE: Value error, 'redis://cache:abc' cannot be parsed",
        ),
        ("SIMILARITY_CACHE", "sqlite:///", "SIMILARITY_CACHE: Value error, sqlite:///PATH needs a file path"),
        ("SIMILARITY_CACHE_TTL", "-1", "SIMILARITY_CACHE_TTL: Input should be greater than or equal to 0"),
        ("SIMILARITY_CACHE_DTYPE", "int8", "SIMILARITY_CACHE_DTYPE: Input should be 'float32' or 'float16'"),
        ("SIMILARITY_CACHE_TIMEOUT", "0", "SIMILARITY_CACHE_TIMEOUT: Input should be greater than 0"),
        ("SIMILARITY_CACHE_MAX_BYTES", "10", "SIMILARITY_CACHE_MAX_BYTES: Input should be greater than or equal"),
    ],
)
def test_bad_cache_variables_are_named(monkeypatch, name, value, message) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load(Settings)


def _flags(*argv: str) -> Settings:
    return settings_from(_parser().parse_args(["score", "in.csv", *argv]))


def test_cli_flags_lay_over_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("SIMILARITY_CACHE", raising=False)
    assert _flags().cache.store == ""  # the CLI's default (local) applies in build
    assert _flags("--no-cache").cache.store == "off"
    assert _flags("--cache", "--cache-ttl", "600").cache.ttl == 600
    monkeypatch.setenv("SIMILARITY_CACHE", "off")
    assert _flags("--cache").cache.store == "local"  # --cache turns an off cache on
    monkeypatch.setenv("SIMILARITY_CACHE", "redis://cache:6379")
    assert _flags("--cache").cache.store == "redis://cache:6379"  # ... and keeps a chosen one
    assert _flags("--no-cache").cache.store == "off"
    with pytest.raises(ConfigError, match="--cache-ttl: Input should be greater than or equal to 0"):
        _flags("--cache-ttl", "-5")


def test_the_cli_default_is_a_local_store_in_the_user_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SIMILARITY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "text-image-similarity"
    run = build(load(Settings), default_cache="local")
    try:
        assert (
            run.cache is not None
            and run.cache.store.name == f"sqlite:{tmp_path / 'xdg' / 'text-image-similarity' / DB_FILE}"
        )
    finally:
        run.close()
    monkeypatch.setenv("SIMILARITY_CACHE_DIR", str(tmp_path / "elsewhere"))
    run = build(load(Settings), default_cache="local")
    try:
        assert run.cache is not None and str(tmp_path / "elsewhere") in run.cache.store.name
    finally:
        run.close()


def test_services_and_the_library_default_to_no_cache(monkeypatch) -> None:
    monkeypatch.delenv("SIMILARITY_CACHE", raising=False)
    assert build(load(ServiceSettings), local_paths=False).cache is None
    assert build(load(Settings)).cache is None
    monkeypatch.setenv("SIMILARITY_CACHE", "off")
    assert build(load(Settings), default_cache="local").cache is None


def test_a_store_that_cannot_open_leaves_the_run_uncached_with_a_warning(monkeypatch, tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SIMILARITY_CACHE", f"sqlite:///{blocker}/sub/c.db")
    with caplog.at_level(logging.WARNING):
        run = build(load(Settings))
    assert run.cache is None and "embedding cache off for this run" in caplog.text


def test_redis_settings_reach_the_client_without_connecting(monkeypatch) -> None:
    monkeypatch.setenv("SIMILARITY_CACHE", "redis://:secret@127.0.0.1:1/0")  # nothing listens on port 1
    monkeypatch.setenv("SIMILARITY_CACHE_TIMEOUT", "0.1")
    run = build(load(ServiceSettings), local_paths=False)
    assert run.cache is not None
    assert "secret" not in run.cache.store.name and "***" in run.cache.store.name
    kwargs = run.cache.store._client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.1 and kwargs["socket_connect_timeout"] == 0.1
    assert kwargs["retry"].get_retries() == 0  # redis-py 8 would retry 10 times with backoff
