"""Fixtures for the command-line tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its fp32 ONNX files, exported once: CLI processes that run it with
    ``--backend onnx`` start in about a second instead of importing torch."""
    from similarity.tools.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("tiny-onnx") / "tiny-clip"
    shutil.copytree(tiny_clip_dir, d)
    export_onnx(d, int8=False)
    return d
