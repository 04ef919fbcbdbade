"""ONNX Runtime backend: the Lambda's CPU path. Needs onnxruntime and numpy only (no torch).

fp32 gives the same embeddings as torch and, with no torch import, the shortest cold start; int8
dynamic quantisation is faster at a measured cost in agreement (docs/performance.md has the
figures per CPU). On CPUs without VNNI only int8 files with per-tensor weights load (see
``similarity.tools.onnx_export``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import hardware
from ..errors import ModelIncomplete
from .base import BackendName, Device, Dtype, require_module
from .files import INT8_WEIGHTS, INT8_WEIGHTS_KEY, require_onnx_files
from .streams import BatchStreams, plan


class OnnxBackend:
    name: BackendName = "onnx"
    device: Device = "cpu"

    def __init__(
        self, model_dir: Path, dtype: Dtype = "fp32", threads: int | None = None, streams: int | None = None
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
            vision, text = pool.map(
                lambda p: ort.InferenceSession(str(p), opts, providers=providers), (paths["vision"], paths["text"])
            )
        if dtype == "int8" and not hardware.has_int8_dot():
            for path, session in zip(paths.values(), (vision, text)):
                if not _marked_per_tensor(session):
                    raise ModelIncomplete(per_channel_int8(path, model_dir))
        self._vision, self._text = vision, text
        self._streams = BatchStreams(count)
        self.dtype: Dtype = dtype

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        return self._streams.run(lambda p: self._vision.run(None, {"pixel_values": p})[0], x)

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._streams.run(
            lambda i, m: self._text.run(None, {"input_ids": i, "attention_mask": m})[0],
            np.asarray(ids, dtype=np.int64),  # the tokenizer's int64 arrays pass through uncopied
            np.asarray(mask, dtype=np.int64),
        )


def _marked_per_tensor(session: Any) -> bool:
    marks: dict[str, str] = session.get_modelmeta().custom_metadata_map
    return marks.get(INT8_WEIGHTS_KEY) == INT8_WEIGHTS


def per_channel_int8(path: Path, model_dir: Path) -> str:
    return (
        f"{path} scales its int8 weights per channel, which saturates ONNX Runtime's int8 kernel on CPUs "
        "without VNNI like this one (0.046 drift on the test model, against 0.011 per tensor): run "
        f"`similarity model export {model_dir}` again (on AWS: invoke the model-sync function)"
    )


def unusable_int8_file(model_dir: Path) -> Path | None:
    """The first int8 file this CPU would refuse (per-channel weights without VNNI), or None. Opens
    each graph without optimising it, for `similarity model info`."""
    if hardware.has_int8_dot():
        return None
    ort = require_module("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for path in require_onnx_files(model_dir, "int8").values():
        if not _marked_per_tensor(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])):
            return path
    return None
