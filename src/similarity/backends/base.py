"""What every inference backend provides, the closed sets of names, and the optional-import helper."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np

from ..errors import BackendUnavailable

BackendName = Literal["torch", "onnx", "openvino"]
Device = Literal["cpu", "cuda"]
Dtype = Literal["fp32", "bf16", "fp16", "int8"]
BackendChoice = Literal["auto", "torch", "onnx", "openvino"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "fp32", "bf16", "fp16", "int8"]

#: Image-tower encoder layers that mixed bf16 keeps in fp32 (torch and OpenVINO alike): rounding the
#: activations entering the first layer is where most of bf16's drift comes from (docs/performance.md).
BF16_FP32_IMAGE_LAYERS = 1

BACKEND_NAMES: tuple[BackendName, ...] = get_args(BackendName)
DTYPES: tuple[Dtype, ...] = get_args(Dtype)


@dataclass(frozen=True)
class PixelNorm:
    """How uint8 pixels become model input: ``(x * rescale - mean) / std`` per channel. A backend
    given one may take uint8 crops and normalise inside its graph (``accepts_uint8``)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float


class Backend(Protocol):
    """Unnormalised embeddings for a batch, as ``CLIPModel.get_*_features`` returns them. A backend
    whose ``accepts_uint8`` attribute is true also takes uint8 ``(N, H, W, 3)`` crops."""

    name: BackendName
    device: Device
    dtype: Dtype

    def image_features(self, pixels: np.ndarray) -> np.ndarray: ...

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


def require_module(module: str, backend: str) -> Any:
    """Import an optional dependency, or say which backend needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"{backend} backend needs {module} ({exc}); install the extra: pip install '.[{backend}]'"
        ) from None
