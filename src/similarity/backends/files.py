"""Where the exported ONNX graphs sit inside a model directory (written by ``model export``)."""

from __future__ import annotations

import hashlib
import json
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
#: Written by ``model export`` beside the graphs, last: the identity of the weights they were made
#: from, so graphs left behind by another checkpoint (a ``model fetch`` into the same directory)
#: are refused instead of scoring with the old model's weights.
EXPORTED_FROM_FILE = "exported-from.json"
_HEAD = _TAIL = 64 * 1024
_BLOCK = 4096


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
    check_exported_from(Path(model_dir))
    return paths


def weights_fingerprint(model_dir: Path) -> str | None:
    """A cheap identity of the checkpoint's bytes: each weights file's name and size, and a hash of
    samples of it (the head, which holds the safetensors header, three inner blocks and the tail);
    None without weights (a directory that ships only the graphs). Two checkpoints differ in
    nearly every byte, so the samples tell them apart without reading 600 MB at every load."""
    from ..model.directory import weights_files  # the model package imports the backends: not at import

    try:
        files = weights_files(model_dir)
    except ModelIncomplete:
        return None  # loading the weights says what is wrong
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                h.update(f"{path.name}:{size}:".encode())
                for at, n in ((0, _HEAD), (size // 4, _BLOCK), (size // 2, _BLOCK), (3 * size // 4, _BLOCK)):
                    f.seek(at)
                    h.update(f.read(n))
                f.seek(max(0, size - _TAIL))
                h.update(f.read(_TAIL))
        except OSError:
            return None  # a shard that cannot be read: loading the weights says what is wrong
    return h.hexdigest()


def mark_exported_from(model_dir: Path) -> None:
    """Record which weights the graphs in ``onnx/`` were made from (``model export``, last)."""
    mark = Path(model_dir) / ONNX_SUBDIR / EXPORTED_FROM_FILE
    mark.write_text(json.dumps({"weights": weights_fingerprint(Path(model_dir))}) + "\n", encoding="utf-8")


def check_exported_from(model_dir: Path) -> None:
    """``ModelIncomplete`` when the graphs were exported from other weights than the directory
    holds. Graphs without the mark (exported before it was written) and a directory without
    weights are taken as they are: there is nothing to compare."""
    mark = model_dir / ONNX_SUBDIR / EXPORTED_FROM_FILE
    try:
        recorded = json.loads(mark.read_text(encoding="utf-8")).get("weights")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        recorded = "unreadable"
    current = weights_fingerprint(model_dir)
    if current is not None and recorded != current:
        raise ModelIncomplete(
            f"{model_dir / ONNX_SUBDIR} was exported from other weights than {model_dir} holds now "
            f"(a model fetched into the same directory?): run `similarity model export {model_dir}` again"
        )
