"""ONNX Runtime backend: the Lambda's CPU path. Needs onnxruntime and numpy only (no torch).

fp32 gives the same embeddings as torch and, with no torch import, the shortest cold start; int8
dynamic quantisation is 2-3x faster at a measured cost in agreement (bench/ and the README have
the figures).
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendUnavailable, ModelIncomplete
from .streams import BatchStreams, plan

ONNX_SUBDIR = "onnx"
_NAMES = {"fp32": ("vision.onnx", "text.onnx"), "int8": ("vision.int8.onnx", "text.int8.onnx")}


def onnx_paths(model_dir: Path, dtype: str = "fp32") -> dict[str, Path]:
    if dtype not in _NAMES:
        raise BackendUnavailable(f"onnx backend supports dtype fp32 or int8, not {dtype!r}")
    v, t = _NAMES[dtype]
    base = Path(model_dir) / ONNX_SUBDIR
    return {"vision": base / v, "text": base / t}


def onnx_files_present(model_dir: Path, dtype: str = "fp32") -> bool:
    return all(p.is_file() for p in onnx_paths(model_dir, dtype).values())


def require_module(module: str, backend: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{backend} backend needs {module}: {exc}") from None


def require_onnx_files(model_dir: Path, dtype: str) -> dict[str, Path]:
    paths = onnx_paths(model_dir, dtype)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ModelIncomplete(f"ONNX files missing: {', '.join(missing)}; run `similarity model export {model_dir}`")
    return paths


class OnnxBackend:
    name = "onnx"
    device = "cpu"

    def __init__(
        self, model_dir: Path, dtype: str = "fp32", threads: int | None = None, streams: int | None = None
    ) -> None:
        ort = require_module("onnxruntime", "onnx")
        paths = require_onnx_files(model_dir, dtype)
        count, per_stream = plan(threads, streams)
        opts = ort.SessionOptions()
        # A session may run from several threads at once; each run then uses its own `per_stream` threads.
        opts.intra_op_num_threads = per_stream
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads would steal the cores our decode threads need between model calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        # Both sessions at once: loading is mostly native code that releases the GIL (~40% off cold start).
        with ThreadPoolExecutor(2) as pool:
            vision, text = pool.map(lambda p: ort.InferenceSession(str(p), opts, providers=providers),
                                    (paths["vision"], paths["text"]))
        self._vision, self._text = vision, text
        self._streams = BatchStreams(count)
        self.dtype = dtype

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        return self._streams.run(lambda p: self._vision.run(None, {"pixel_values": p})[0], x)

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._streams.run(
            lambda i, m: self._text.run(None, {"input_ids": i, "attention_mask": m})[0],
            np.asarray(ids, dtype=np.int64),  # the tokenizer's int64 arrays pass through uncopied
            np.asarray(mask, dtype=np.int64),
        )
