"""Settings: read once from the environment, validated at start, every error naming its variable
(or the CLI flag that set it)."""

from __future__ import annotations

import pytest

from similarity.bootstrap import build
from similarity.config import ServeSettings, ServiceSettings, Settings, load
from similarity.errors import ConfigError


def test_streams_and_threads_are_read_and_checked(monkeypatch) -> None:
    monkeypatch.setenv("SIMILARITY_THREADS", "4")
    monkeypatch.setenv("SIMILARITY_STREAMS", "2")
    s = load(Settings)
    assert (s.model.threads, s.model.streams) == (4, 2)
    monkeypatch.setenv("SIMILARITY_STREAMS", "0")
    with pytest.raises(ConfigError, match="SIMILARITY_STREAMS: Input should be greater than or equal to 1"):
        load(Settings)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SIMILARITY_BATCH_SIZE", "abc", "SIMILARITY_BATCH_SIZE: Input should be a valid integer"),
        ("SIMILARITY_BATCH_SIZE", "0", "SIMILARITY_BATCH_SIZE: Input should be greater than or equal to 1"),
        ("SIMILARITY_FETCH_DEADLINE", "0", "SIMILARITY_FETCH_DEADLINE: Input should be greater than 0"),
        (
            "SIMILARITY_BACKEND",
            "tensorflow",
            "SIMILARITY_BACKEND: Input should be 'auto', 'torch', 'onnx' or 'openvino'",
        ),
        ("SIMILARITY_ALLOWED_NETWORKS", "10.0.0.0/33", "SIMILARITY_ALLOWED_NETWORKS: .*invalid network"),
        ("SIMILARITY_ALLOW_LOCAL_PATHS", "maybe", "SIMILARITY_ALLOW_LOCAL_PATHS: Input should be a valid boolean"),
    ],
)
def test_a_bad_variable_is_named_in_the_error(monkeypatch, name, value, message) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load(Settings)


@pytest.mark.parametrize(("name", "value"), [("MAX_PAIRS", "0"), ("CHUNK_ROWS", "x"), ("WORKER_RESERVE_SECONDS", "-1")])
def test_service_variables_are_checked_too(monkeypatch, name, value) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}: "):
        load(ServiceSettings)


def test_blank_variables_mean_the_default(monkeypatch) -> None:
    monkeypatch.setenv("SIMILARITY_BATCH_SIZE", " ")
    monkeypatch.setenv("CLIP_MODEL_DIR", "")
    s = load(Settings)
    assert s.score.batch_size == 32 and s.model.dir == "models/clip-vit-base-patch32"


def test_flags_lay_over_the_environment_and_are_named_in_errors(monkeypatch) -> None:
    monkeypatch.setenv("SIMILARITY_BATCH_SIZE", "8")
    monkeypatch.setenv("SIMILARITY_WORKERS", "3")
    s = load(Settings).with_overrides("score", {"batch_size": 64, "workers": None})
    assert (s.score.batch_size, s.score.workers) == (64, 3)  # None: not given on the command line
    with pytest.raises(ConfigError, match="--batch-size: Input should be greater than or equal to 1"):
        s.with_overrides("score", {"batch_size": -3}, {"batch_size": "--batch-size"})


def test_local_paths_follow_the_entry_point_unless_the_variable_says(monkeypatch) -> None:
    s = load(Settings)
    assert build(s, local_paths=True).fetcher.settings.allow_local_paths is True
    assert build(s, local_paths=False).fetcher.settings.allow_local_paths is False
    monkeypatch.setenv("SIMILARITY_ALLOW_LOCAL_PATHS", "false")
    assert build(load(Settings), local_paths=True).fetcher.settings.allow_local_paths is False


def test_worker_memory_falls_back_to_the_lambda_variable(monkeypatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
    assert load(ServiceSettings).jobs.worker_memory_mb == 2048
    monkeypatch.setenv("WORKER_MEMORY_MB", "3008")
    assert load(ServiceSettings).jobs.worker_memory_mb == 3008


def test_read_timeout_never_exceeds_the_deadline(monkeypatch) -> None:
    monkeypatch.setenv("SIMILARITY_FETCH_DEADLINE", "3")
    f = build(load(Settings)).fetcher.settings
    assert (f.deadline, f.read_timeout) == (3, 3)


def test_cli_log_level_is_validated_with_its_name(monkeypatch, capsys) -> None:
    from similarity.cli import main

    monkeypatch.setenv("SIMILARITY_LOG_LEVEL", "loud")
    assert main(["--version"]) == 2
    assert "SIMILARITY_LOG_LEVEL" in capsys.readouterr().err
    monkeypatch.setenv("SIMILARITY_LOG_LEVEL", "info")  # any case, as SERVER_LOG_LEVEL
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


@pytest.mark.parametrize(
    "name",
    ["SIMILARITY_FETCH_DEADLINE", "SIMILARITY_DECODE_BUDGET_MP", "API_RESERVE_SECONDS", "SERVER_GRACEFUL_TIMEOUT"],
)
def test_infinity_is_refused_at_start_with_the_name(monkeypatch, name) -> None:
    # Before: "inf" passed every bound from below, then overflowed a timer or int() later (an
    # internal_error per row, a 500 per request, a crash of `serve`).
    monkeypatch.setenv(name, "inf")
    with pytest.raises(ConfigError, match=f"{name}: Input should be a finite number"):
        load({"API": ServiceSettings, "SERVER": ServeSettings}.get(name.split("_")[0], Settings))


def test_the_variable_named_is_the_one_that_was_set(monkeypatch) -> None:
    # Before: a bad AWS_LAMBDA_FUNCTION_MEMORY_SIZE was reported as SIMILARITY_MEMORY_MB.
    monkeypatch.delenv("SIMILARITY_MEMORY_MB", raising=False)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "64")
    with pytest.raises(
        ConfigError, match="AWS_LAMBDA_FUNCTION_MEMORY_SIZE: Input should be greater than or equal to 128"
    ):
        load(Settings)
    monkeypatch.setenv("SIMILARITY_MEMORY_MB", "abc")
    with pytest.raises(ConfigError, match="SIMILARITY_MEMORY_MB: Input should be a valid integer"):
        load(Settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ECS_CLUSTER": "gpu", "ECS_TASK_DEFINITION": "td"}, "ECS_SUBNETS: .*needs the task's subnets"),
        ({"ECS_CLUSTER": "gpu", "ECS_SUBNETS": "subnet-a"}, "ECS_TASK_DEFINITION: .*set together"),
        ({"ECS_TASK_DEFINITION": "td"}, "ECS_TASK_DEFINITION: .*set together"),
    ],
)
def test_half_a_gpu_configuration_is_refused_at_start(monkeypatch, env, message) -> None:
    # Before: no subnets failed only at RunTask, on the first large file; a cluster without its
    # task definition sent every file down the Lambda path without a word.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load(ServiceSettings)
    monkeypatch.setenv("ECS_CLUSTER", "gpu")
    monkeypatch.setenv("ECS_TASK_DEFINITION", "td")
    monkeypatch.setenv("ECS_SUBNETS", "subnet-a, subnet-b")
    jobs = load(ServiceSettings).jobs
    assert jobs.gpu_enabled and jobs.ecs_subnets == ("subnet-a", "subnet-b")
