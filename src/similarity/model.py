"""CLIP loaded from a local directory in Hugging Face layout (the EFS mount in production).

Loading never talks to a hub: the directory must already hold the files (``similarity model fetch``
puts them there on a machine with network). The tokenizer runs on the Rust ``tokenizers`` library
straight from ``tokenizer.json``, so the ONNX backend needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
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
    if need_weights and not (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    ):
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
    """transformers' ``CLIPModel``: the reference path, bf16 on CPU where asked, fp16 on CUDA."""

    name = "torch"

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "fp32") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from transformers import CLIPModel
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise BackendUnavailable(f"torch backend needs torch and transformers: {exc}") from None
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("--device cuda asked for, but torch sees no CUDA device")
        if device == "cuda" and dtype == "fp32":
            dtype = "fp16"
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise BackendUnavailable(f"torch backend supports fp32, bf16 or fp16, not {dtype!r}")
        torch_dtype = dtypes[dtype]
        model = CLIPModel.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, dtype=torch_dtype
        )
        self.model = model.eval().to(device)
        self.torch = torch
        self.device = device
        self.dtype = dtype
        self._tdtype = torch_dtype

    @staticmethod
    def _pooled(out: Any) -> Any:
        return out if hasattr(out, "shape") else out.pooler_output  # transformers 4 vs 5

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, self._tdtype)
            y = self._pooled(self.model.get_image_features(pixel_values=x))
            return y.float().cpu().numpy()

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            i = torch.from_numpy(ids).to(self.device)
            m = torch.from_numpy(mask).to(self.device)
            y = self._pooled(self.model.get_text_features(input_ids=i, attention_mask=m))
            return y.float().cpu().numpy()


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


def resolve_backend(backend: str, device: str, model_dir: Path) -> tuple[str, str]:
    """``auto`` picks CUDA torch where there is a GPU, else ONNX Runtime when the exported files
    and onnxruntime are present, else torch fp32 on the CPU."""
    if backend != "auto":
        return backend, device
    if device == "cuda":
        return "torch", "cuda"
    # Importing torch costs ~1 s: only look for CUDA where an NVIDIA driver is present at all.
    if device == "auto" and (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()):
        try:
            import torch

            if torch.cuda.is_available():
                return "torch", "cuda"
        except ImportError:
            pass
    try:
        from .onnx_backend import onnx_files_present

        import onnxruntime  # noqa: F401

        if onnx_files_present(model_dir):
            return "onnx", "cpu"
    except ImportError:
        pass
    return "torch", "cpu"


def load_model(
    model_dir: str | os.PathLike[str],
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "fp32",
    threads: int | None = None,
) -> ClipModel:
    """Load CLIP from ``model_dir``. ``backend``: auto | torch | onnx; ``dtype`` (torch): fp32 |
    bf16 | fp16; (onnx): fp32 | int8."""
    start = time.perf_counter()
    path = Path(model_dir)
    backend, device = resolve_backend(backend, device, path)
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
        if threads:
            import torch

            torch.set_num_threads(threads)
        impl = TorchBackend(path, device=device, dtype=dtype)
    elif backend == "onnx":
        from .onnx_backend import OnnxBackend

        impl = OnnxBackend(path, dtype=dtype, threads=threads)
    elif backend == "openvino":
        from .onnx_backend import OpenVinoBackend

        impl = OpenVinoBackend(path, dtype=dtype, threads=threads)
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
