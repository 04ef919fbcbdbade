"""Each container image's entry points import with only what that image installs.

No Docker engine runs here, so each Dockerfile stage's pip installs are read (the wheel's extras and
the packages named), resolved against pyproject.toml and this venv's metadata, and the entry
modules are imported in a fresh interpreter in which every other installed package is refused.
A missing extra (the GPU task without powertools: every GPU job exits 1 at import) fails here."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support.lambda_env import dockerfile_stages

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "text-image-similarity"

#: What each stage runs: the template's Lambda commands and the images' entry points (the modules
#: they import at start, and the libraries their code paths import later).
ENTRIES: dict[str, list[str]] = {
    "lambda": ["handler.api", "handler.s3_event", "handler.worker", "handler.task_stopped", "onnxruntime", "openvino"],
    "tools": ["handler.model_sync", "similarity.tools.hub", "torch", "transformers", "onnx", "huggingface_hub"],
    "gpu": ["handler.gpu_task", "torch", "transformers", "redis"],
    "serve": ["similarity.server.app", "onnxruntime", "openvino", "redis"],
    "serve-gpu": ["similarity.server.app", "torch", "transformers"],
}

_BLOCKER = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in this image)", name=name)
sys.meta_path.insert(0, Refuse())
for module in ENTRIES:
    __import__(module)
"""


def _pyproject() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, their dependencies included (markers evaluated
    for this interpreter; extras followed, the project's own among them)."""
    ours = _pyproject()
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = []
    for text in requirements:
        req = Requirement(text)
        todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        seen.add(name)
        if name == PROJECT:
            reqs = ours[""] + [r for e in extras for r in ours[e]]
            todo += [(canonicalize_name(Requirement(r).name), frozenset(Requirement(r).extras)) for r in reqs]
            continue
        try:
            declared = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue  # not installed here: nothing of it can be imported anyway
        for text in declared:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return seen


def _stage_requirements(stage: str) -> list[str]:
    """What ``pip install`` puts into ``stage`` and the stages it is built FROM."""
    stages = dockerfile_stages()
    text = (ROOT / "Dockerfile").read_text()
    parent = re.search(rf"^FROM (\S+) AS {re.escape(stage)}$", text, flags=re.M)
    assert parent is not None, stage
    reqs = _stage_requirements(parent.group(1)) if parent.group(1) in stages else []
    body = stages[stage].replace("\\\n", " ")
    for line in re.findall(r"pip install ([^&\n]*)", body):
        for word in re.findall(r'"([^"]+)"', line):
            extras = re.fullmatch(r"\$\(ls /wheels/\*\.whl\)\[([\w,-]+)\]", word)
            reqs.append(f"{PROJECT}[{extras.group(1)}]" if extras else word)
    return reqs


def _blocked(allowed: set[str]) -> list[str]:
    """Top-level import names of the installed distributions the image does not have."""
    names = []
    for module, dists in md.packages_distributions().items():
        if module.startswith("_") or module in ("similarity", "handler"):
            continue
        if not any(canonicalize_name(d) in allowed for d in dists):
            names.append(module)
    return sorted(names)


def test_every_lambda_command_is_an_entry_of_its_image() -> None:
    commands = re.findall(r'Command: \["([\w.]+)\.lambda_handler"\]', (ROOT / "template.yaml").read_text())
    assert commands and set(commands) <= set(ENTRIES["lambda"] + ENTRIES["tools"])
    assert set(ENTRIES) <= set(dockerfile_stages())


@pytest.mark.parametrize("stage", sorted(ENTRIES))
def test_the_images_entry_points_import_with_what_it_installs(stage) -> None:
    allowed = _closure(_stage_requirements(stage))
    blocked = _blocked(allowed)
    assert "pyspark" in blocked  # the check refuses something real (the test venv has every extra)
    script = f"BLOCKED = {set(blocked)!r}\nENTRIES = {ENTRIES[stage]!r}\n" + _BLOCKER
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT / "src")
    assert proc.returncode == 0, proc.stderr[-2000:]
