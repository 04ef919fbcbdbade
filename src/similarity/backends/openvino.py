"""OpenVINO backend on the exported ONNX files: the bf16 path on CPUs with AVX-512 BF16 or AMX
(ONNX Runtime's CPU provider has no bf16 kernels) and the more exact of the two int8 paths. Needs
openvino and numpy only (no torch).

bf16 is mixed precision, like the torch backend's: the transformer layers' weight matmuls run in
bf16 while the patch embedding (it sees raw pixels) and both output projections stay fp32. Those
are under 3% of the FLOPs, and keeping them fp32 halves the error against the fp32 reference (test
bed 0.0025 -> 0.0012). OpenVINO applies one precision hint to a whole compiled graph, so each
tower's graph is cut at those boundaries: the patch embedding becomes a graph compiled for fp32 and
the projections numpy matmuls, with their weights read from the ONNX graph.

int8 (opt-in) makes the same cut. The transformer's weight matmuls get int8 weights with one fp32
scale per output channel, and OpenVINO quantises their inputs at run time in groups of 128 values
per token, running them on VNNI/AMX int8 kernels. On the bench's CPU that runs end to end as fast
as ONNX Runtime's dynamic int8 (one scale per tensor) within the host's noise, with less error
against fp32 (test bed 0.0041 against 0.006-0.013, random full-size model 0.0015 against 0.0024).
Per-token groups also keep a row's result independent of the other rows in its batch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, ModelIncomplete
from .base import BackendName, Device, Dtype, require_module
from .files import ONNX_SUBDIR, require_onnx_files
from .streams import plan, row_parts


class OpenVinoBackend:
    """Compiled graphs are cached next to the model so only the first load pays the compile."""

    name: BackendName = "openvino"
    device: Device = "cpu"

    def __init__(
        self,
        model_dir: Path,
        dtype: Dtype = "bf16",
        threads: int | None = None,
        streams: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        """``cache_dir`` holds the cut graphs and compiled blobs (default: beside the ONNX files)."""
        ov = require_module("openvino", "openvino")
        if dtype not in ("fp32", "bf16", "int8"):
            raise BackendUnavailable(f"openvino backend supports fp32, bf16 or int8, not {dtype!r}")
        paths = require_onnx_files(model_dir, "fp32")
        core = ov.Core()
        if dtype == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailable("this CPU has no bf16 support; use --dtype fp32")
        count, per_stream = plan(threads, streams)
        fp32 = {
            "INFERENCE_PRECISION_HINT": "f32",
            # Each stream runs one infer request at a time on its own `per_stream` threads.
            "PERFORMANCE_HINT": "LATENCY" if count == 1 else "THROUGHPUT",
            "NUM_STREAMS": count,
            "INFERENCE_NUM_THREADS": count * per_stream,
        }
        cache = _writable(cache_dir or Path(model_dir) / ONNX_SUBDIR / "openvino-cache")
        if cache:
            fp32["CACHE_DIR"] = str(cache)
        # int8: the non-matmul ops stay fp32: as fast as under the bf16 hint here, and closer to the
        # reference (test bed 0.0041 against 0.0050).
        core_cfg = (
            {**fp32, "INFERENCE_PRECISION_HINT": "bf16"}
            if dtype == "bf16"
            else {**fp32, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}
        )
        self.dtype: Dtype = dtype
        if dtype == "fp32":
            graphs = {"vision": (paths["vision"], fp32), "text": (paths["text"], fp32)}
            self._vision_proj = self._text_proj = None
        else:
            parts, projections = _mixed_graphs(ov, core, paths, cache, dtype)
            self._vision_proj, self._text_proj = projections["vision"], projections["text"]
            graphs = {
                "embed": (parts["embed"], fp32),
                "vision": (parts["vision"], core_cfg),
                "text": (parts["text"], core_cfg),
            }
        # Compiling is native code that releases the GIL, so the graphs load side by side.
        with ThreadPoolExecutor(len(graphs)) as pool:
            compiled = dict(
                zip(graphs, pool.map(lambda g: core.compile_model(_arg(g[0]), "CPU", g[1]), graphs.values()))
            )
        self._embed = compiled.get("embed")
        self._vision, self._text = compiled["vision"], compiled["text"]
        self._streams = count

    # A batch is cut into one part per stream and each part goes to its own infer request, started
    # asynchronously: OpenVINO then runs them at once on its streams' threads. (Blocking infer calls
    # from several Python threads instead lost 10% end to end in the bench's set-up.)
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        parts = [x[p] for p in row_parts(len(x), self._streams)]
        if self._embed is None:
            return np.concatenate(_run_parts(self._vision, [{"pixel_values": p} for p in parts]))
        embedded = _run_parts(self._embed, [{"pixel_values": p} for p in parts])
        pooled = np.concatenate(_run_parts(self._vision, [[e] for e in embedded]))
        assert self._vision_proj is not None  # the mixed path always cuts off the projection
        return np.asarray(pooled.astype(np.float32, copy=False) @ self._vision_proj)

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)  # no copy when int64
        inputs = [{"input_ids": ids[p], "attention_mask": mask[p]} for p in row_parts(len(ids), self._streams)]
        out = np.concatenate(_run_parts(self._text, inputs))
        return out if self._text_proj is None else out.astype(np.float32, copy=False) @ self._text_proj


def _run_parts(compiled: Any, inputs: list[Any]) -> list[np.ndarray]:
    """The first output for each input, each run on its own infer request, all at once."""
    requests = [compiled.create_infer_request() for _ in inputs]
    for request, data in zip(requests, inputs):
        request.start_async(data)
    errors = []
    for request in requests:  # wait for every request before raising: none may outlive its inputs
        try:
            request.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
    if errors:
        raise errors[0]
    return [np.array(r.get_output_tensor(0).data) for r in requests]


def _writable(path: str | Path) -> Path | None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only model directory: compile every time
    return Path(path) if os.access(path, os.W_OK) else None


def _arg(graph: Any) -> Any:
    # A file path lets OpenVINO find its compiled blob in the cache without reading the model.
    return str(graph) if isinstance(graph, Path) else graph


def _mixed_graphs(
    ov: Any, core: Any, paths: dict[str, Path], cache: Path | None, dtype: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The three graphs of the mixed-precision path (``dtype`` bf16 or int8 for the transformer
    weights) and the two projection matrices. Cutting the graphs means reading ~600 MB of ONNX
    (about 0.9 s), so the pieces are saved once as OpenVINO IR in the cache, keyed by the ONNX
    files' size and mtime (a re-export makes a new key)."""
    stats = [paths[t].stat() for t in ("vision", "text")]
    # One prefix per model directory (several models may share one cache directory), one key per export.
    prefix = f"mixed-{dtype}-" + hashlib.sha256(str(paths["vision"].resolve()).encode()).hexdigest()[:12]
    name = f"{prefix}-" + "-".join(f"{st.st_size:x}{st.st_mtime_ns:x}" for st in stats)
    d = cache / name if cache else None
    names = ("embed", "vision", "text")
    if d and (d / "projections.npz").is_file():
        with np.load(d / "projections.npz") as npz:
            return {n: d / f"{n}.xml" for n in names}, {"vision": npz["vision"], "text": npz["text"]}
    embed, vision, vision_proj = _split_vision(ov, core.read_model(str(paths["vision"])))
    text, text_proj = _split_text(ov, core.read_model(str(paths["text"])))
    weights = _bf16_weights if dtype == "bf16" else _int8_weights
    weights(ov, vision)
    weights(ov, text)
    graphs, projections = dict(zip(names, (embed, vision, text))), {"vision": vision_proj, "text": text_proj}
    if d:
        tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")
        try:
            tmp.mkdir(exist_ok=True)
            for n, g in graphs.items():
                ov.save_model(g, str(tmp / f"{n}.xml"), compress_to_fp16=False)
            np.savez(tmp / "projections.npz", vision=projections["vision"], text=projections["text"])
            tmp.rename(d)  # whole or not at all, even with several processes loading at once
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in d.parent.glob(f"{prefix}-*"):  # this model's earlier exports
            if old.name != d.name and not old.name.startswith(f"{d.name}.tmp"):
                shutil.rmtree(old, ignore_errors=True)
        if (d / "projections.npz").is_file():
            # Compile from the files from the start, so there is one compiled blob per graph.
            return {n: d / f"{n}.xml" for n in names}, projections
    return graphs, projections


def _projection(model: Any, tower: str) -> tuple[Any, np.ndarray]:
    """(the pooled output, the projection as a numpy fp32 matrix). The exporter ends each tower
    with ``pooled @ W`` (a bias-free Linear)."""
    matmul = model.get_results()[0].input_value(0).get_node()
    weight = matmul.input_value(1).get_node() if matmul.get_type_name() == "MatMul" else None
    attrs = matmul.get_attributes()
    if weight is None or weight.get_type_name() != "Constant" or attrs.get("transpose_a"):
        raise ModelIncomplete(f"{tower} ONNX graph does not end in the projection; re-run `similarity model export`")
    w = np.asarray(weight.get_data(), dtype=np.float32)
    return matmul.input_value(0), np.ascontiguousarray(w.T if attrs.get("transpose_b") else w)


def _split_text(ov: Any, model: Any) -> tuple[Any, np.ndarray]:
    """(the text transformer up to the pooled output, the projection)."""
    pooled, proj = _projection(model, "text")
    return ov.Model([pooled], model.get_parameters(), "text_core"), proj


def _split_vision(ov: Any, model: Any) -> tuple[Any, Any, np.ndarray]:
    """(patch/position embedding graph, transformer graph, projection). The embedding ends where the
    first layer norm (CLIP's pre-layernorm, an MVN op in OpenVINO) begins."""
    pooled, proj = _projection(model, "vision")
    mvn = next((op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"), None)
    if mvn is None:
        raise ModelIncomplete("vision ONNX graph has no layer norm to split at; re-run `similarity model export`")
    emb = mvn.input_value(0)
    consumers = list(emb.get_target_inputs())  # taken before the embedding graph adds its own Result
    embed = ov.Model([emb], model.get_parameters(), "vision_embed")
    param = ov.opset13.parameter(emb.get_partial_shape(), emb.get_element_type(), name="embeddings")
    for target in consumers:
        target.replace_source_output(param.output(0))
    return embed, ov.Model([pooled], [param], "vision_core"), proj


def _weight_matmuls(ov: Any, model: Any) -> list[tuple[Any, np.ndarray, dict[str, Any]]]:
    """(matmul, its fp32 constant weight, its attributes) for every matmul with a weight."""
    found = []
    for op in model.get_ordered_ops():
        weight = op.input_value(1).get_node() if op.get_type_name() == "MatMul" else None
        if weight is not None and weight.get_type_name() == "Constant" and weight.get_element_type() == ov.Type.f32:
            found.append((op, weight.get_data(), op.get_attributes()))
    return found


def _int8_weights(ov: Any, model: Any) -> None:
    """Symmetric int8 weights with one fp32 scale per output channel, written in the pattern
    (int8 constant -> convert -> multiply by scale) that OpenVINO keeps as compressed weights and
    runs with int8 kernels when dynamic quantisation is on."""
    opset = ov.opset13
    for op, data, attrs in _weight_matmuls(ov, model):
        w = np.asarray(data, dtype=np.float32)
        w = w if attrs["transpose_b"] else w.T  # [out, in]
        scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0  # an all-zero row stays zero
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        weight = opset.multiply(opset.convert(opset.constant(q), ov.Type.f32), opset.constant(scale.astype(np.float32)))
        op.output(0).replace(opset.matmul(op.input_value(0), weight, attrs["transpose_a"], True).output(0))


def _bf16_weights(ov: Any, model: Any) -> None:
    """Give every weight matmul bf16 weights and a bf16 cast of its input, with the result cast back
    to fp32. OpenVINO's bf16 hint alone does the same math but keeps the fp32 weights beside its
    bf16 copies: stating bf16 in the graph keeps RSS ~0.45 GB lower and halves the cached files, at
    the same agreement with fp32 (test bed 0.0012, random full-size model 0.0004)."""
    opset = ov.opset13
    for op, data, attrs in _weight_matmuls(ov, model):
        x = opset.convert(op.input_value(0), ov.Type.bf16)
        product = opset.matmul(x, _bf16_constant(ov, data), attrs["transpose_a"], attrs["transpose_b"])
        op.output(0).replace(opset.convert(product, ov.Type.f32).output(0))


def _bf16_constant(ov: Any, values: np.ndarray) -> Any:
    """fp32 -> bf16 with round-to-nearest-even (what the CPU's own conversion does); numpy has no
    bf16, so the bits are computed as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    tensor = ov.Tensor(ov.Type.bf16, ov.Shape(list(values.shape)))
    tensor.data.view(np.uint16)[...] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return ov.op.Constant(tensor)
