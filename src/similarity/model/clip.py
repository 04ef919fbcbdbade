"""CLIP loaded from a local directory in Hugging Face layout (the EFS mount in production).

Loading never talks to a hub: the directory must already hold the files (``similarity model fetch``
puts them there on a machine with network).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import backends
from ..backends import (
    Backend,
    BackendChoice,
    BackendName,
    BackendOptions,
    Device,
    DeviceChoice,
    Dtype,
    DtypeChoice,
    PixelNorm,
)
from ..errors import BackendUnavailable, ModelIncomplete, ModelNotFound, SimilarityError
from .device_pixels import PixelPath
from .directory import check_model_dir, max_caption_tokens, read_identity
from .preprocess import PreprocessConfig, load_pixels, normalise
from .selection import resolve
from .tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    revision: str
    path: str
    backend: BackendName
    device: Device
    dtype: Dtype
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


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class ClipModel:
    """Preprocessing, tokenizer and a backend, with unit-norm embeddings out."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: CaptionTokenizer,
        preprocess: PreprocessConfig,
        info: ModelInfo,
        pixel_path: PixelPath = "pillow",
        device_pixels: Callable[[bytes], np.ndarray] | None = None,
    ):
        """``device_pixels``: what ``pixels`` runs for the ``torch`` and ``nvjpeg`` pixel paths
        (``DevicePixels``); None: Pillow on the CPU."""
        self.backend = backend
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.info = info
        self.pixel_path: PixelPath = pixel_path if device_pixels is not None else "pillow"
        self.device_pixels = device_pixels

    @property
    def uint8_pixels(self) -> bool:
        """Whether images go to the backend as uint8 crops (it normalises inside its graph)."""
        return bool(getattr(self.backend, "accepts_uint8", False))

    def pixels(self, data: bytes) -> np.ndarray:
        """Image bytes to this model's input (decode, convert, resize, crop, normalise): float32
        ``(3, H, W)``, or the uint8 ``(H, W, 3)`` crop where the backend normalises it itself."""
        if self.device_pixels is not None:
            return self.device_pixels(data)
        return load_pixels(data, self.preprocess, uint8=self.uint8_pixels)

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels``: float32 ``(N, 3, H, W)`` model input, or uint8 ``(N, H, W, 3)`` crops."""
        if pixels.dtype == np.uint8 and not self.uint8_pixels:
            pixels = normalise(pixels, self.preprocess)
        return _normalise(self.backend.image_features(pixels))

    def embed_texts(self, captions: list[str]) -> tuple[np.ndarray, list[bool]]:
        ids, mask, truncated = self.tokenizer(captions)
        return _normalise(self.backend.text_features(ids, mask)), truncated


def load_model(
    model_dir: str | os.PathLike[str],
    backend: BackendChoice = "auto",
    device: DeviceChoice = "auto",
    dtype: DtypeChoice = "auto",
    threads: int | None = None,
    streams: int | None = None,
    cache_dir: str | None = None,
    jpeg_draft: int = 0,
    pixels: PixelPath = "pillow",
) -> ClipModel:
    """Load CLIP from ``model_dir``; ``selection.resolve`` says what ``auto`` picks. ``threads``
    (default: every core) are split into ``streams`` (default: one per thread) that run the parts
    of each batch at once; the torch backend uses ``threads`` only. ``cache_dir``: where OpenVINO
    keeps its compiled graphs (default: beside the ONNX files). ``jpeg_draft``: opt-in JPEG draft
    decoding (``PreprocessConfig.draft_factor``; 0, the default, is off: it moves scores).
    ``pixels``: where image bytes become model input (``device_pixels.PixelPath``): ``torch``
    resizes on the model's device, to the bit as ``pillow`` does; ``nvjpeg`` also decodes JPEGs
    on the GPU, and needs the model there."""
    start = time.perf_counter()
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelNotFound(f"model directory {str(path)!r} does not exist")
    chosen = resolve(backend, device, path, dtype)
    check_model_dir(path, need_weights=not backends.REGISTRY[chosen.backend].needs_onnx)
    tokenizer = CaptionTokenizer(path, max_caption_tokens(path))
    preprocess = PreprocessConfig.from_model_dir(path, draft_factor=jpeg_draft)
    norm = PixelNorm(preprocess.mean, preprocess.std, preprocess.rescale_factor)
    try:
        impl = backends.create(
            chosen.backend, path, chosen.device, chosen.dtype, BackendOptions(threads, streams, cache_dir, norm)
        )
    except SimilarityError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged graph or weights file: the runtime's own error
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        hint = f"; run `similarity model export {path}` again" if backends.REGISTRY[chosen.backend].needs_onnx else ""
        raise ModelIncomplete(
            f"{chosen.backend} cannot load the model in {path}: {type(exc).__name__}: {first}{hint}"
        ) from None
    device_pixels = None
    if pixels != "pillow":
        from .device_pixels import DevicePixels

        if pixels == "nvjpeg" and impl.device != "cuda":
            raise BackendUnavailable(
                f"SIMILARITY_PIXELS=nvjpeg decodes JPEGs on the GPU: it needs the model on CUDA, not {impl.device}"
            )
        if impl.device == "cpu":
            log.warning(
                "SIMILARITY_PIXELS=%s on the CPU: the same pixels as pillow, but slower (it is for a GPU)", pixels
            )
        device_pixels = DevicePixels(
            preprocess,
            device=impl.device,
            uint8=bool(getattr(impl, "accepts_uint8", False)),
            decoder="nvjpeg" if pixels == "nvjpeg" else "pillow",
        )
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
    return ClipModel(impl, tokenizer, preprocess, info, pixels, device_pixels)
