"""The environment a Lambda function runs in, for tests and benches that run a handler in a fresh
process: the variables the runtime sets (what tells powertools and the X-Ray SDK they are in
Lambda, and a sampled trace) and the ones the image's Dockerfile stage sets, read from the
Dockerfile so they are never restated."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLED_TRACE = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"


def runtime_env(
    function_name: str, task_root: str | Path, xray_port: int, memory_mb: int | None = None
) -> dict[str, str]:
    """What the Lambda runtime sets for one sampled invocation; X-Ray segments go to 127.0.0.1:``xray_port``."""
    env = {
        "AWS_LAMBDA_FUNCTION_NAME": function_name,
        "LAMBDA_TASK_ROOT": str(task_root),  # what tells the X-Ray SDK it runs in Lambda
        "_X_AMZN_TRACE_ID": SAMPLED_TRACE,
        "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{xray_port}",
    }
    if memory_mb is not None:
        env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = str(memory_mb)
    return env


def dockerfile_stages(dockerfile: Path = ROOT / "Dockerfile") -> dict[str, str]:
    """Each named build stage's lines (``FROM ... AS name`` up to the next ``FROM``), by name."""
    return dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", dockerfile.read_text(), flags=re.S | re.M))


def dockerfile_env(stage: str, dockerfile: Path = ROOT / "Dockerfile") -> dict[str, str]:
    """The ``ENV KEY=VALUE ...`` settings of one build stage (its own lines, not its parent's)."""
    stages = dockerfile_stages(dockerfile)
    if stage not in stages:
        raise KeyError(f"no stage {stage!r} in {dockerfile}")
    body = stages[stage].replace("\\\n", " ")  # continuation lines
    env: dict[str, str] = {}
    for line in body.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, sep, value = word.partition("=")
                if not sep:
                    raise ValueError(f"{dockerfile}: only ENV KEY=VALUE is read, not {line!r}")
                env[key] = value
    return env


def tiny_api_env(model_dir: str | Path, **overrides: str) -> dict[str, str]:
    """The API function's settings in the in-process handler tests: the tiny model on torch, the
    loopback image server admitted, powertools' tracer off; ``overrides`` on top."""
    return {
        "CLIP_MODEL_DIR": str(model_dir),
        "SIMILARITY_BACKEND": "torch",
        "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
        "POWERTOOLS_TRACE_DISABLED": "true",
        **overrides,
    }
