"""What installing gives: the main job's install holds only what CPU scoring needs, the wheel is
the library alone, the library imports where Linux-only functions are missing, and a plain
``pip install .`` names the extra a backend needs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEST_TOOLS = {"pytest", "pytest-timeout", "moto", "cfn-lint", "aws-sam-translator", "hypothesis", "ruff", "mypy"}
TORCH = {"torch", "transformers", "nvidia-cublas-cu12", "triton"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.slow
def test_cpu_extra_resolves_without_torch_or_test_tools(tmp_path) -> None:
    # Before: `make run` installed every extra (1.7 GB, dev tools included); on a plain Linux box,
    # PyPI's torch is the CUDA build (5.4 GB).
    report = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation",
         "--quiet", "--report", str(report), ".[cpu]"],  # fmt: skip
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"onnxruntime", "openvino", "numpy", "pydantic-settings"} <= names
    assert not names & (TEST_TOOLS | TORCH), names & (TEST_TOOLS | TORCH)


def test_make_run_installs_only_the_cpu_extra() -> None:
    makefile = (ROOT / "Makefile").read_text()
    run_installs = re.findall(r"\$\(RUN_VENV\)/bin/pip install -q (?!--upgrade)(.*)", makefile)
    assert run_installs == ['-e ".[cpu]"'], run_installs
    extras = _pyproject()["project"]["optional-dependencies"]
    assert not any(dep.split("[")[0].split(">")[0] in TORCH | TEST_TOOLS for dep in extras["cpu"])


def test_wheel_ships_only_the_library(tmp_path) -> None:
    # Before: the wheel also installed a top-level `handler` package.
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"similarity"}
    assert "similarity/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_python_versions_are_not_capped() -> None:
    spec = _pyproject()["project"]["requires-python"]
    assert spec == ">=3.11" and "<" not in spec


def test_dockerfile_copies_the_handlers_into_each_image_that_runs_them() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    by_name = {s.split()[2]: s for s in stages if " AS " in s.splitlines()[0]}
    assert "COPY src/handler ${LAMBDA_TASK_ROOT}/handler" in by_name["lambda"]
    assert by_name["tools"].startswith("lambda AS tools")  # built on the lambda image: has them too
    gpu = by_name["gpu"]
    assert "WORKDIR /app" in gpu and "COPY src/handler /app/handler" in gpu and '"-m", "handler.gpu_task"' in gpu


@pytest.mark.parametrize(("stage", "where"), [("lambda", "${LAMBDA_TASK_ROOT}/handler"), ("gpu", "/app/handler")])
def test_images_hold_the_handlers_bytecode(tmp_path, stage: str, where: str) -> None:
    """Lambda's /var/task is read-only: without bytecode in the image, each cold start compiled
    the handlers again. The stage's own compile command, run on a copy, leaves bytecode that an
    import with the sources read-only uses (the library's comes from pip installing the wheel)."""
    import shutil

    text = (ROOT / "Dockerfile").read_text()
    body = next(s for s in re.split(r"^FROM ", text, flags=re.M) if s.split()[2] == stage)
    commands = [line[4:] for line in body.splitlines() if line.startswith("RUN ") and "compileall" in line]
    assert len(commands) == 1, f"the {stage} stage does not byte-compile its handlers"
    command = commands[0]
    assert where in command
    task = tmp_path / "task"
    shutil.copytree(ROOT / "src" / "handler", task / "handler", ignore=shutil.ignore_patterns("__pycache__"))
    argv = command.replace(where, str(task / "handler")).split()
    assert argv[:3] == ["python", "-m", "compileall"], argv
    subprocess.run([sys.executable, *argv[1:]], check=True, timeout=120)
    for path in [*(task / "handler").glob("*.py"), task / "handler"]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    # Every module the import system compiles from source is recorded; the handlers' must be none.
    probe = f"""
import importlib.machinery as m, importlib, pkgutil, sys
compiled, compile = [], m.SourceFileLoader.source_to_code
m.SourceFileLoader.source_to_code = lambda self, data, path, **kw: compiled.append(path) or compile(self, data, path, **kw)
import handler
for info in pkgutil.iter_modules(handler.__path__):
    importlib.import_module("handler." + info.name)
print(len(sys.modules), *[p for p in compiled if p.startswith({str(task)!r})])
"""
    env = {"PYTHONPATH": f"{task}:{ROOT / 'src'}", "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, *from_source = r.stdout.split()
    assert int(loaded) > 100 and from_source == [], from_source


@pytest.mark.parametrize(
    "missing",
    [
        ("sched_getaffinity",),  # macOS
        ("sched_getaffinity", "register_at_fork", "fork", "forkpty"),  # Windows (the stdlib checks for fork)
    ],
)
def test_library_imports_without_linux_only_functions(missing) -> None:
    code = (
        "import os\n"
        f"for name in {missing!r}:\n"
        "    if hasattr(os, name): delattr(os, name)\n"
        "import similarity, similarity.cli, similarity.bootstrap, similarity.hardware\n"
        "from similarity.fetch import deadline\n"
        "assert similarity.hardware.cpu_count() >= 1\n"
        "assert similarity.cli.main(['--version']) == 0\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "similarity" in r.stdout, r.stderr


BLOCK_BACKENDS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'onnxruntime', 'openvino'}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
from similarity.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_plain_install_names_the_extra_to_install(tmp_path, tiny_clip_dir) -> None:
    # A plain `pip install .` has no backend: as if none of their packages were there.
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_BACKENDS, "score", str(ROOT / "examples" / "challenge_set.csv"),
         "-o", str(tmp_path / "o.csv"), "--model", str(tiny_clip_dir)],  # fmt: skip
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "pip install '.[cpu]'" in r.stderr and "Traceback" not in r.stderr
    info = subprocess.run([sys.executable, "-c", BLOCK_BACKENDS, "model", "info", str(tiny_clip_dir)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert info.returncode == 3
    report = json.loads(info.stdout)
    assert report["runs_as"] is None and not any(b["installed"] for b in report["backends"].values())
