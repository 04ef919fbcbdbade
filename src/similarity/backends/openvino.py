"""OpenVINO backend on the exported ONNX files: the bf16 path on CPUs with AVX-512 BF16 or AMX
(ONNX Runtime's CPU provider has no bf16 kernels) and an int8 path. Needs openvino and numpy only
(no torch).

bf16 is mixed precision, like the torch backend's: the transformer layers' weight matmuls run in
bf16, except in the image tower's first encoder layer, while the patch embedding (it sees raw
pixels), that first layer and both output projections stay fp32. The drift of bf16 comes mostly
from rounding the activations that feed the first layer: on the test model's large files
(tests/support/parity.large_images), rounding everything after the patch embedding moved
similarities by 0.0027-0.0055, keeping the first layer fp32 as well by 0.0016-0.0018, for ~20%
more image-tower CPU on ViT-B/32 (docs/performance.md). OpenVINO applies one precision hint to a
whole compiled graph, so the image tower is cut after its first layer: the embedding and that
layer become a graph compiled for fp32, the rest a graph compiled for bf16, and the projections are
numpy matmuls with their weights read from the ONNX graph. The fp32 piece also comes as a variant
that takes uint8 crops and normalises them inside the graph (``accepts_uint8``), so Python hands
over the crop only.

int8 (opt-in) cuts at the pre-layernorm instead. The transformer's weight matmuls get int8 weights
with one fp32 scale per output channel, and OpenVINO quantises their inputs at run time in groups
of 128 values per token, running them on VNNI/AMX int8 kernels. Per-token groups keep a row's
result independent of the other rows in its batch.

Two caches. The cut pieces (OpenVINO IR with the reduced weights, and the projections) depend on
the model only: ``similarity model export`` writes them beside the ONNX files, where functions may
only read them; a load that finds none cuts the graphs itself (~1 s per 600 MB of ONNX) and keeps
them in the cache directory. The compiled blobs depend on the CPU: OpenVINO writes them into a
subdirectory of the cache directory named after its version and the CPU's features, so hosts of
different CPU types can share one cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, ModelIncomplete
from ..hardware import cpu_feature_key
from .base import BF16_FP32_IMAGE_LAYERS, BackendName, Device, Dtype, PixelNorm, require_module
from .files import ONNX_SUBDIR, require_onnx_files
from .streams import plan, row_parts

log = logging.getLogger(__name__)

#: Image-tower encoder layers kept fp32 (with the patch embedding) on the mixed path, per dtype.
FP32_LAYERS = {"bf16": BF16_FP32_IMAGE_LAYERS, "int8": 0}
#: Part of every cut piece's name: bump it when the cut or the weight recipe changes.
CUT_VERSION = 2
#: Beside the ONNX files: the cut pieces ``similarity model export`` writes.
PIECES_SUBDIR = "openvino"
#: The default cache directory, beside the ONNX files (a temporary directory where that is read-only).
CACHE_SUBDIR = "openvino-cache"
#: ``cache_dir`` value that caches nothing: for a process that loads once on a disk that starts
#: empty (a Lambda sandbox's /tmp), where writing the compiled blobs only costs time.
NO_CACHE = "off"
_PIECES = ("embed", "embed_u8", "vision", "text")


class OpenVinoBackend:
    """Compiled graphs are cached so only the first load on a CPU type pays the compile."""

    name: BackendName = "openvino"
    device: Device = "cpu"

    def __init__(
        self,
        model_dir: Path,
        dtype: Dtype = "bf16",
        threads: int | None = None,
        streams: int | None = None,
        cache_dir: str | Path | None = None,
        pixel_norm: PixelNorm | None = None,
    ) -> None:
        """``cache_dir``: the cut pieces when export did not write them, and the compiled blobs per
        OpenVINO version and CPU type (default: beside the ONNX files, else a temporary directory).
        ``pixel_norm``: lets the mixed path take uint8 crops (``accepts_uint8``)."""
        ov = require_module("openvino", "openvino")
        if dtype not in ("fp32", "bf16", "int8"):
            raise BackendUnavailable(f"openvino backend supports fp32, bf16 or int8, not {dtype!r}")
        paths = require_onnx_files(model_dir, "fp32")
        core = ov.Core()
        if dtype == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailable("this CPU has no bf16 support; use --dtype fp32")
        count, per_stream = plan(threads, streams)
        fp32: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "f32",
            # Each stream runs one infer request at a time on its own `per_stream` threads.
            "PERFORMANCE_HINT": "LATENCY" if count == 1 else "THROUGHPUT",
            "NUM_STREAMS": count,
            "INFERENCE_NUM_THREADS": count * per_stream,
        }
        cache = cache_root(model_dir, cache_dir)
        if cache:
            fp32["CACHE_DIR"] = str(compiled_cache_dir(ov, cache))
        # int8: the non-matmul ops stay fp32: as fast as under the bf16 hint here, and closer to the
        # reference (test bed 0.0041 against 0.0050).
        core_cfg = (
            {**fp32, "INFERENCE_PRECISION_HINT": "bf16"}
            if dtype == "bf16"
            else {**fp32, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}
        )
        self.dtype: Dtype = dtype
        self._core, self._fp32 = core, fp32
        self._embed_lock = threading.Lock()
        self._embed: Any = None
        self._embed_u8: Any = None
        self._embed_source: Any = None
        if dtype == "fp32":
            graphs = {"vision": (paths["vision"], fp32), "text": (paths["text"], fp32)}
            self._vision_proj = self._text_proj = None
        else:
            pieces = mixed_pieces(ov, core, Path(model_dir), paths, cache, dtype, pixel_norm)
            self._vision_proj, self._text_proj = pieces.projections["vision"], pieces.projections["text"]
            self._embed_source = pieces.graphs["embed"]
            first = "embed_u8" if "embed_u8" in pieces.graphs else "embed"
            graphs = {
                first: (pieces.graphs[first], fp32),
                "vision": (pieces.graphs["vision"], core_cfg),
                "text": (pieces.graphs["text"], core_cfg),
            }
        compiled = _compile_all(core, graphs, fp32.get("CACHE_DIR"))
        self._embed_u8 = compiled.get("embed_u8")
        self._embed = compiled.get("embed")  # with uint8 crops coming, float input compiles it when first seen
        self._vision, self._text = compiled["vision"], compiled["text"]
        self._streams = count
        self.accepts_uint8 = self._embed_u8 is not None

    def _float_embed(self) -> Any:
        with self._embed_lock:
            if self._embed is None:
                self._embed = self._core.compile_model(_arg(self._embed_source), "CPU", self._fp32)
            return self._embed

    # A batch is cut into one part per stream and each part goes to its own infer request, started
    # asynchronously: OpenVINO then runs them at once on its streams' threads. (Blocking infer calls
    # from several Python threads instead lost 10% end to end in the bench's set-up.)
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels``: float32 ``(N, 3, H, W)``, or (``accepts_uint8``) uint8 ``(N, H, W, 3)`` crops."""
        uint8 = pixels.dtype == np.uint8
        if uint8 and self._embed_u8 is None:
            raise ValueError("this OpenVINO path takes float32 pixels, not uint8 crops")
        x = np.ascontiguousarray(pixels) if uint8 else np.ascontiguousarray(pixels, dtype=np.float32)
        parts = [x[p] for p in row_parts(len(x), self._streams)]
        if self._vision_proj is None:
            return np.concatenate(_run_parts(self._vision, [[p] for p in parts]))
        embed = self._embed_u8 if uint8 else self._float_embed()
        embedded = _run_parts(embed, [[p] for p in parts])
        pooled = np.concatenate(_run_parts(self._vision, [[e] for e in embedded]))
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


def cache_root(model_dir: str | Path, cache_dir: str | Path | None) -> Path | None:
    """The cache directory in use: ``cache_dir`` when given (None if it is ``NO_CACHE`` or cannot be
    written: then nothing is cached), else beside the ONNX files, else a temporary directory."""
    if str(cache_dir or "").strip().lower() == NO_CACHE:
        return None
    if cache_dir:
        return _writable(cache_dir)
    return _writable(Path(model_dir) / ONNX_SUBDIR / CACHE_SUBDIR) or _writable(
        Path(tempfile.gettempdir()) / "similarity-openvino-cache"
    )


def compiled_cache_dir(ov: Any, cache: Path) -> Path:
    """Where OpenVINO keeps its compiled blobs: one directory per OpenVINO version and CPU type."""
    return cache / f"ov{ov.get_version().split('-')[0]}-cpu{cpu_feature_key()}"


def _compile_all(core: Any, graphs: dict[str, tuple[Any, dict[str, Any]]], cache_dir: str | None) -> dict[str, Any]:
    """Each graph compiled, side by side (native code that releases the GIL). OpenVINO writes its
    blobs in place: a process reading one another is still writing dies of SIGBUS, so with a blob
    cache the compiles of every process sharing it take turns (an advisory lock file there). A
    compile that fails on the cache is done again without it."""

    def compile_all(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        with ThreadPoolExecutor(len(graphs)) as pool:
            return dict(
                zip(graphs, pool.map(lambda n: core.compile_model(_arg(graphs[n][0]), "CPU", configs[n]), graphs))
            )

    configs = {n: cfg for n, (_g, cfg) in graphs.items()}
    if not cache_dir:
        return compile_all(configs)
    try:
        with _cache_lock(Path(cache_dir)):
            return compile_all(configs)
    except RuntimeError as exc:  # a blob half-written by a process that died, a full disk
        log.warning("OpenVINO compile with the blob cache failed (%s); compiling without it", str(exc)[:200])
        return compile_all({n: {k: v for k, v in cfg.items() if k != "CACHE_DIR"} for n, cfg in configs.items()})


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``cache_dir/.compile.lock`` while held; nothing where the file
    cannot be made or locked (read-only, a file system without locks, Windows)."""
    try:
        import fcntl

        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / ".compile.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks here: as before
        yield
    finally:
        os.close(fd)  # releases the lock


def _writable(path: str | Path) -> Path | None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only: compile every time
    return Path(path) if os.access(path, os.W_OK) else None


def _arg(graph: Any) -> Any:
    # A file path lets OpenVINO find its compiled blob in the cache without reading the model.
    return str(graph) if isinstance(graph, Path) else graph


class Pieces:
    """The mixed path's graphs (IR file paths, or in-memory models when nothing could be saved)
    and the two projection matrices."""

    def __init__(self, graphs: dict[str, Any], projections: dict[str, np.ndarray]) -> None:
        self.graphs, self.projections = graphs, projections


def recipe(dtype: str, pixel_norm: PixelNorm | None) -> str:
    """What the pieces' content depends on besides the ONNX files: precision, layers kept fp32,
    cut version and (for the uint8 input) the normalisation."""
    norm = "" if pixel_norm is None else "-u8" + hashlib.sha256(repr(pixel_norm).encode()).hexdigest()[:8]
    return f"mixed-{dtype}-l{FP32_LAYERS[dtype]}v{CUT_VERSION}{norm}"


def _export_key(paths: dict[str, Path]) -> str:
    # A re-export writes new files, so their sizes and mtimes name one export.
    stats = [paths[t].stat() for t in ("vision", "text")]
    return "-".join(f"{st.st_size:x}{st.st_mtime_ns:x}" for st in stats)


def _load_pieces(d: Path, pixel_norm: PixelNorm | None) -> Pieces | None:
    names = [n for n in _PIECES if n != "embed_u8" or pixel_norm is not None]
    if not (d / "projections.npz").is_file() or not all((d / f"{n}.xml").is_file() for n in names):
        return None
    with np.load(d / "projections.npz") as npz:
        return Pieces({n: d / f"{n}.xml" for n in names}, {"vision": npz["vision"], "text": npz["text"]})


def exported_pieces_dir(model_dir: Path, paths: dict[str, Path], dtype: str, pixel_norm: PixelNorm | None) -> Path:
    """Where ``write_pieces`` puts this export's pieces, beside the ONNX files."""
    return model_dir / ONNX_SUBDIR / PIECES_SUBDIR / f"{recipe(dtype, pixel_norm)}-{_export_key(paths)}"


def mixed_pieces(
    ov: Any,
    core: Any,
    model_dir: Path,
    paths: dict[str, Path],
    cache: Path | None,
    dtype: str,
    pixel_norm: PixelNorm | None,
) -> Pieces:
    """The pieces written by export if they are there, else those cut earlier into ``cache``, else
    cut now (and saved to ``cache`` when it is writable)."""
    found = _load_pieces(exported_pieces_dir(model_dir, paths, dtype, pixel_norm), pixel_norm)
    if found:
        return found
    # One prefix per model directory (several models may share one cache directory), one key per export.
    prefix = f"{recipe(dtype, pixel_norm)}-" + hashlib.sha256(str(paths["vision"].resolve()).encode()).hexdigest()[:12]
    d = cache / f"{prefix}-{_export_key(paths)}" if cache else None
    if d:
        found = _load_pieces(d, pixel_norm)
        if found:
            return found
    pieces = cut(ov, core, paths, dtype, pixel_norm)
    if d and _save(ov, pieces, d):
        for old in d.parent.glob(f"{prefix}-*"):  # this model's earlier exports
            if old.name != d.name and ".tmp" not in old.name:
                shutil.rmtree(old, ignore_errors=True)
        saved = _load_pieces(d, pixel_norm)
        if saved:
            # Compile from the files from the start, so there is one compiled blob per graph.
            return saved
    return pieces


def write_pieces(model_dir: str | Path, dtype: str = "bf16", pixel_norm: PixelNorm | None = None) -> Path | None:
    """Cut the exported ONNX files and save the pieces beside them (``similarity model export``
    calls this), so loads read them instead of cutting (the cut reads ~600 MB of ONNX). Returns
    the directory, or None when it could not be written."""
    ov = require_module("openvino", "openvino")
    model_dir = Path(model_dir)
    paths = require_onnx_files(model_dir, "fp32")
    d = exported_pieces_dir(model_dir, paths, dtype, pixel_norm)
    if _load_pieces(d, pixel_norm):
        return d
    if not _save(ov, cut(ov, ov.Core(), paths, dtype, pixel_norm), d):
        return None
    for old in d.parent.glob(f"{recipe(dtype, pixel_norm)}-*"):  # an earlier export's pieces
        if old.name != d.name and ".tmp" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return d


def cut(ov: Any, core: Any, paths: dict[str, Path], dtype: str, pixel_norm: PixelNorm | None) -> Pieces:
    """Cut both towers at their fp32 boundaries and give the rest reduced weights."""
    embed, vision, vision_proj = _split_vision(ov, core.read_model(str(paths["vision"])), FP32_LAYERS[dtype])
    text, text_proj = _split_text(ov, core.read_model(str(paths["text"])))
    weights = _bf16_weights if dtype == "bf16" else _int8_weights
    weights(ov, vision)
    weights(ov, text)
    graphs = {"embed": embed, "vision": vision, "text": text}
    if pixel_norm is not None:
        graphs["embed_u8"] = _uint8_input(ov, embed.clone(), pixel_norm)
    return Pieces(graphs, {"vision": vision_proj, "text": text_proj})


def _save(ov: Any, pieces: Pieces, d: Path) -> bool:
    """Write the pieces into ``d`` whole or not at all, even with several processes at once."""
    tmp = d.with_name(f"{d.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for n, g in pieces.graphs.items():
            ov.save_model(g, str(tmp / f"{n}.xml"), compress_to_fp16=False)
        np.savez(tmp / "projections.npz", vision=pieces.projections["vision"], text=pieces.projections["text"])
        tmp.rename(d)
    except (OSError, RuntimeError):  # OpenVINO reports a failed write (a full disk) as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
    return (d / "projections.npz").is_file()


def _uint8_input(ov: Any, model: Any, norm: PixelNorm) -> Any:
    """``model`` taking its pixels as uint8 ``(N, H, W, 3)`` crops, converted, transposed and
    normalised inside the graph: ``(x * r - mean) / std == (x - mean / r) / (std / r)``. Matches
    numpy's normalisation to float rounding (~2e-6)."""
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    inp = ppp.input(0)
    inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    inp.model().set_layout(ov.Layout("NCHW"))
    r = norm.rescale
    inp.preprocess().convert_element_type(ov.Type.f32).mean([m / r for m in norm.mean]).scale([s / r for s in norm.std])
    return ppp.build()


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


def _split_vision(ov: Any, model: Any, fp32_layers: int = 0) -> tuple[Any, Any, np.ndarray]:
    """(the fp32 graph: patch/position embedding and the first ``fp32_layers`` encoder layers; the
    rest of the transformer; the projection). Layer norms are MVN ops in OpenVINO: CLIP's
    pre-layernorm, then two per encoder layer, then the post-layernorm. With no layer kept the cut
    is where the pre-layernorm begins; with ``n``, at the residual stream entering layer ``n``,
    where that layer's first norm begins."""
    pooled, proj = _projection(model, "vision")
    mvns = [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]
    at = 0 if fp32_layers == 0 else 1 + 2 * fp32_layers
    if len(mvns) < at + 2:  # the cut's own norm and the post-layernorm at least
        raise ModelIncomplete("vision ONNX graph has no layer norm to split at; re-run `similarity model export`")
    emb = mvns[at].input_value(0)
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
