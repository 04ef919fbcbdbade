"""What every inference backend provides, the closed sets of names, and the optional-import helper."""

from __future__ import annotations

import importlib
from typing import Any, Literal, Protocol, get_args

import numpy as np

from ..errors import BackendUnavailable

BackendName = Literal["torch", "onnx", "openvino"]
Device = Literal["cpu", "cuda"]
Dtype = Literal["fp32", "bf16", "fp16", "int8"]
BackendChoice = Literal["auto", "torch", "onnx", "openvino"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "fp32", "bf16", "fp16", "int8"]

BACKEND_NAMES: tuple[BackendName, ...] = get_args(BackendName)
DTYPES: tuple[Dtype, ...] = get_args(Dtype)


class Backend(Protocol):
    """Unnormalised embeddings for a batch, as ``CLIPModel.get_*_features`` returns them."""

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
