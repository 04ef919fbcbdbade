"""Where the exported ONNX graphs sit inside a model directory (written by ``model export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..errors import BackendUnavailable, ModelIncomplete

ONNX_SUBDIR = "onnx"
OnnxDtype = Literal["fp32", "int8"]
_NAMES: dict[str, tuple[str, str]] = {
    "fp32": ("vision.onnx", "text.onnx"),
    "int8": ("vision.int8.onnx", "text.int8.onnx"),
}
#: Metadata the export writes into the int8 graphs: how their weights are scaled. Files without it
#: (exported before 2026-12-04) scale per channel, which saturates ONNX Runtime's int8 kernel on
#: CPUs without VNNI (``similarity.tools.onnx_export``).
INT8_WEIGHTS_KEY = "similarity.int8_weights"
INT8_WEIGHTS = "per_tensor"


def onnx_paths(model_dir: Path, dtype: str = "fp32") -> dict[str, Path]:
    if dtype not in _NAMES:
        raise BackendUnavailable(f"onnx backend supports dtype fp32 or int8, not {dtype!r}")
    v, t = _NAMES[dtype]
    base = Path(model_dir) / ONNX_SUBDIR
    return {"vision": base / v, "text": base / t}


def onnx_files_present(model_dir: Path, dtype: str = "fp32") -> bool:
    return all(p.is_file() for p in onnx_paths(model_dir, dtype).values())


def require_onnx_files(model_dir: Path, dtype: str) -> dict[str, Path]:
    paths = onnx_paths(model_dir, dtype)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ModelIncomplete(f"ONNX files missing: {', '.join(missing)}; run `similarity model export {model_dir}`")
    return paths
