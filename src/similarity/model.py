"""CLIP loaded from a local directory in Hugging Face layout (the EFS mount in production).

Loading never talks to a hub: the directory must already hold the files (``similarity model fetch``
puts them there on a machine with network). The tokenizer runs on the Rust ``tokenizers`` library
straight from ``tokenizer.json``, so the ONNX backend needs neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import BackendUnavailable, ModelIncomplete, ModelNotFound
from .images import PreprocessConfig

DEFAULT_MODEL_ID = "openai/clip-vit-base-patch32"
MODEL_META_FILE = ".similarity-model.json"  # written by `model fetch`: id and resolved revision


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    revision: str
    path: str
    backend: str
    device: str
    dtype: str
    load_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "revision": self.revision,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "load_seconds": round(self.load_seconds, 3),
        }


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _has_weights(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()


def check_model_dir(model_dir: str | os.PathLike[str], need_weights: bool = True) -> Path:
    """Raise ``ModelNotFound`` / ``ModelIncomplete`` with the exact missing files."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelNotFound(f"model directory {str(path)!r} does not exist")
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
    if not (path / "tokenizer.json").is_file() and not (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    ):
        missing.append("tokenizer.json")
    if need_weights and not _has_weights(path):
        missing.append("model.safetensors")
    if missing:
        raise ModelIncomplete(f"model directory {str(path)!r} lacks {', '.join(missing)}")
    return path


def read_identity(model_dir: Path) -> tuple[str, str]:
    """(model id, revision) as recorded by ``model fetch``, else the best the config tells."""
    meta = _json(model_dir / MODEL_META_FILE)
    if meta.get("model_id"):
        return str(meta["model_id"]), str(meta.get("revision") or "unknown")
    cfg = _json(model_dir / "config.json")
    name = cfg.get("_name_or_path") or model_dir.name
    return str(name), "local"


# --------------------------------------------------------------------------- tokenizer
class CaptionTokenizer:
    """CLIP's BPE from ``tokenizer.json``: pads to the longest caption in the batch (never to the
    model maximum) and truncates to the model's limit, keeping the end-of-text token."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        tok_file = model_dir / "tokenizer.json"
        if tok_file.is_file():
            tok = Tokenizer.from_file(str(tok_file))
        else:  # vocab.json + merges.txt only: let transformers assemble the same pipeline
            from transformers import CLIPTokenizer

            tok = CLIPTokenizer.from_pretrained(str(model_dir), local_files_only=True).backend_tokenizer
        tcfg = _json(model_dir / "tokenizer_config.json")
        pad = tcfg.get("pad_token") or "<|endoftext|>"
        pad = pad.get("content", "<|endoftext|>") if isinstance(pad, dict) else str(pad)
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ModelIncomplete(f"tokenizer has no pad token {pad!r}")
        self.max_length = max_length
        tok.no_padding()
        tok.no_truncation()
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(pad_id=pad_id, pad_token=pad)
        self._tok = tok

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        encs = self._tok.encode_batch(captions)
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask, [bool(e.overflowing) for e in encs]


# --------------------------------------------------------------------------- backends
class Backend(Protocol):
    name: str
    device: str
    dtype: str

    def image_features(self, pixels: np.ndarray) -> np.ndarray: ...

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    """transformers' ``CLIPModel``: the fp32 reference, mixed bf16 on CPUs with native bf16, fp16 on CUDA."""

    name = "torch"

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "fp32", threads: int | None = None) -> None:
        """``device`` is cpu or cuda: ``resolve_backend`` has already decided what auto means."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            torch = _import_torch()
            from transformers import CLIPModel
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise BackendUnavailable(f"torch backend needs torch and transformers: {exc}") from None
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("--device cuda asked for, but torch sees no CUDA device")
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise BackendUnavailable(f"torch backend supports fp32, bf16 or fp16, not {dtype!r}")
        self._autocast = device == "cpu" and dtype == "bf16"
        # CPU bf16 loads fp32 and runs mixed (see _mixed_bf16); CUDA casts the whole model.
        torch_dtype = torch.float32 if self._autocast else dtypes[dtype]
        model = CLIPModel.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, dtype=torch_dtype
        )
        if self._autocast:
            _mixed_bf16(torch, model)
        self.model = model.eval().to(device)
        self.torch = torch
        self.device = device
        self.dtype = dtype
        self._tdtype = torch_dtype

    def _context(self) -> Any:
        torch = self.torch
        if self._autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _pooled(out: Any) -> Any:
        return out if hasattr(out, "shape") else out.pooler_output  # transformers 4 vs 5

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode(), self._context():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, self._tdtype)
            y = self._pooled(self.model.get_image_features(pixel_values=x))
            return y.float().cpu().numpy()

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode(), self._context():
            i = torch.from_numpy(ids).to(self.device)
            m = torch.from_numpy(mask).to(self.device)
            y = self._pooled(self.model.get_text_features(input_ids=i, attention_mask=m))
            return y.float().cpu().numpy()


def _mixed_bf16(torch: Any, model: Any) -> None:
    """bf16 where it is cheap in accuracy, fp32 where it is not.

    Run under ``torch.autocast``: the encoder's matmuls take bf16 inputs with fp32 accumulation
    while layer norms, softmax statistics and the residual stream stay fp32. Its Linear weights are
    stored in bf16 (autocast would cast them on every call, and this halves their memory). The
    patch embedding (it sees raw pixels) and the two output projections stay fp32 outside autocast:
    under 3% of the FLOPs, and on the test bed it halves the error (max |similarity difference|
    0.0021 -> 0.0013; casting the whole model to bf16 gives 0.0026).
    """

    class KeepFp32(torch.nn.Module):
        def __init__(self, layer: Any) -> None:
            super().__init__()
            self.layer = layer

        @property
        def weight(self) -> Any:  # CLIPVisionEmbeddings reads patch_embedding.weight.dtype
            return self.layer.weight

        def forward(self, x: Any) -> Any:
            with torch.autocast("cpu", enabled=False):
                return self.layer(x.float())

    keep = {"vision_model.embeddings.patch_embedding", "visual_projection", "text_projection"}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in keep:
            module.to(torch.bfloat16)
    # The fp32 tensors left still point into the memory-mapped checkpoint, which keeps all 600 MB of
    # it resident; copies let it be unmapped.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != torch.bfloat16:
                tensor.data = tensor.data.clone()
    model.vision_model.embeddings.patch_embedding = KeepFp32(model.vision_model.embeddings.patch_embedding)
    model.visual_projection = KeepFp32(model.visual_projection)
    model.text_projection = KeepFp32(model.text_projection)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- the model
class ClipModel:
    """Preprocessing config, tokenizer and a backend, with unit-norm embeddings out."""

    def __init__(self, backend: Backend, tokenizer: CaptionTokenizer, preprocess: PreprocessConfig, info: ModelInfo):
        self.backend = backend
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.info = info

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        return _normalise(self.backend.image_features(pixels))

    def embed_texts(self, captions: list[str]) -> tuple[np.ndarray, list[bool]]:
        ids, mask, truncated = self.tokenizer(captions)
        return _normalise(self.backend.text_features(ids, mask)), truncated


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once: both capability checks and every load ask."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """x86 CPUs with bf16 dot-product instructions (AVX-512 BF16 or AMX); elsewhere bf16 would be
    emulated and slower than fp32."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """x86 CPUs with int8 dot-product instructions (VNNI or AMX). OpenVINO's run-time activation
    quantisation is built on them; elsewhere it would fall back to fp32 matmuls on int8 weights,
    slower than fp32 itself here, while ONNX Runtime's int8 has kernels for such CPUs too."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _installed(module: str) -> bool:
    """Without importing it (torch alone costs ~1 s of cold start)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(backend: str, device: str, model_dir: Path, dtype: str = "auto") -> tuple[str, str, str]:
    """(backend, device, dtype) to load.

    ``auto``/``auto`` picks the fastest path whose similarities stay within 0.002 of fp32 (bench/
    and tests/test_backends.py measure it): CUDA torch fp16 on a GPU; on a CPU with native bf16,
    mixed bf16 with OpenVINO (needs the exported ONNX files) or else torch; else ONNX Runtime fp32
    when the exported files and onnxruntime are present (the Lambda image, which has neither torch
    nor OpenVINO); else torch fp32. Naming a backend without a dtype gives its fp32 path (fp16 on
    CUDA); ``--dtype fp32`` runs fp32 on CUDA too. int8 is never picked: it is opt-in, and
    ``--dtype int8`` gets OpenVINO's int8 where the CPU has VNNI (as fast within noise, and closer
    to fp32), else ONNX Runtime's.
    """
    from .onnx_backend import onnx_files_present

    if backend == "auto":
        bf16_cpu = dtype in ("auto", "bf16") and device in ("auto", "cpu") and cpu_has_native_bf16()
        if dtype == "int8":
            ov_int8 = cpu_has_int8_dot() and _installed("openvino") and onnx_files_present(model_dir)
            backend = "openvino" if ov_int8 else "onnx"
        elif device == "cuda" or (device == "auto" and _cuda_present()):
            backend, device = "torch", "cuda"
        elif bf16_cpu and _installed("openvino") and onnx_files_present(model_dir):
            return "openvino", "cpu", "bf16"
        elif bf16_cpu and _installed("torch") and _installed("transformers") and _has_weights(model_dir):
            return "torch", "cpu", "bf16"
        elif dtype in ("auto", "fp32") and _installed("onnxruntime"):
            backend = "onnx" if onnx_files_present(model_dir) else "torch"
        else:
            backend = "torch"
    if backend == "torch" and device == "auto":
        device = "cuda" if _cuda_present() else "cpu"
    if dtype == "auto":
        dtype = "fp16" if (backend, device) == ("torch", "cuda") else "fp32"
    if backend != "torch":
        device = "cpu"
    return backend, device, dtype


def _cuda_present() -> bool:
    # Importing torch costs ~1 s: only ask it where an NVIDIA driver is present at all.
    if not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()):
        return False
    try:
        return bool(_import_torch().cuda.is_available())
    except ImportError:
        return False


def _import_torch() -> Any:
    if "torch" not in sys.modules:
        # OpenMP workers that spin between model calls take the cores our decode threads need
        # (+13% end to end when they sleep; ONNX Runtime turns spinning off the same way). Read
        # once, when torch loads its OpenMP runtime, so only the first import can set it.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


def load_model(
    model_dir: str | os.PathLike[str],
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    streams: int | None = None,
) -> ClipModel:
    """Load CLIP from ``model_dir``. ``backend``: auto | torch | onnx | openvino; ``dtype``: auto |
    fp32 | bf16 | fp16 (torch) | int8 (onnx, openvino); ``resolve_backend`` says what auto picks.
    ``threads`` (default: every core) are split into ``streams`` (default: one per thread) that run
    the parts of each batch at once; the torch backend uses ``threads`` only."""
    start = time.perf_counter()
    path = Path(model_dir)
    backend, device, dtype = resolve_backend(backend, device, path, dtype)
    check_model_dir(path, need_weights=(backend == "torch"))
    cfg = _json(path / "config.json")
    text_cfg = cfg.get("text_config", {})
    max_len = int(text_cfg.get("max_position_embeddings", 77))
    tcfg_max = _json(path / "tokenizer_config.json").get("model_max_length")
    if isinstance(tcfg_max, int) and 0 < tcfg_max < max_len:
        max_len = tcfg_max
    tokenizer = CaptionTokenizer(path, max_len)
    preprocess = PreprocessConfig.from_model_dir(path)
    impl: Backend
    if backend == "torch":
        impl = TorchBackend(path, device=device, dtype=dtype, threads=threads)
    elif backend == "onnx":
        from .onnx_backend import OnnxBackend

        impl = OnnxBackend(path, dtype=dtype, threads=threads, streams=streams)
    elif backend == "openvino":
        from .openvino_backend import OpenVinoBackend

        impl = OpenVinoBackend(path, dtype=dtype, threads=threads, streams=streams)
    else:
        raise BackendUnavailable(f"unknown backend {backend!r} (auto, torch, onnx, openvino)")
    model_id, revision = read_identity(path)
    info = ModelInfo(
        model_id=model_id,
        revision=revision,
        path=str(path),
        backend=impl.name,
        device=impl.device,
        dtype=impl.dtype,
        load_seconds=time.perf_counter() - start,
    )
    return ClipModel(impl, tokenizer, preprocess, info)
