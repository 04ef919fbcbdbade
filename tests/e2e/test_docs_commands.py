"""Runs the README's CLI examples as written (in a copy of examples/, with the tiny model's ONNX
files), each ending with status 0 and leaving the file its comment names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _examples() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    cli = readme[readme.index("## CLI\n") :]
    block = cli.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("similarity ")]


def test_readme_cli_examples_run_as_written(tmp_path, tiny_onnx_dir) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CLIP_MODEL_DIR": str(tiny_onnx_dir),
        "SIMILARITY_BACKEND": "onnx",
        "SIMILARITY_ALLOWED_NETWORKS": "",
    }
    examples = _examples()
    assert len(examples) >= 5
    for line in examples:
        # A pipeline's status is its last command's, as in a user's shell (`| head` may cut the CLI off:
        # it then ends with 141 quietly, which tests/e2e/test_cli.py checks).
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (line, r.stderr)
        named = re.search(r"# -> (\S+)", line)
        if named:
            assert (tmp_path / named.group(1)).is_file(), line
        if "| head -3" in line:
            assert len(r.stdout.splitlines()) == 3 and r.stdout.startswith("url,caption,similarity")
