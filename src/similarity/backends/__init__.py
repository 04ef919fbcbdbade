"""Inference backends behind one protocol, and the registry that builds them by name.

``create`` is the only place a backend name turns into a class, so adding a backend means adding
one module and one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import (
    BACKEND_NAMES,
    DTYPES,
    Backend,
    BackendChoice,
    BackendName,
    Device,
    DeviceChoice,
    Dtype,
    DtypeChoice,
    PixelNorm,
    require_module,
)
from .files import ONNX_SUBDIR, onnx_files_present, onnx_paths


@dataclass(frozen=True)
class BackendOptions:
    threads: int | None = None
    streams: int | None = None
    cache_dir: str | None = None
    #: Lets a backend take uint8 crops and normalise them itself (OpenVINO's mixed path).
    pixel_norm: PixelNorm | None = None


def _torch(model_dir: Path, device: Device, dtype: Dtype, opts: BackendOptions) -> Backend:
    from .torch import TorchBackend

    return TorchBackend(model_dir, device=device, dtype=dtype, threads=opts.threads)


def _onnx(model_dir: Path, device: Device, dtype: Dtype, opts: BackendOptions) -> Backend:
    from .onnx import OnnxBackend

    return OnnxBackend(model_dir, dtype=dtype, threads=opts.threads, streams=opts.streams)


def _openvino(model_dir: Path, device: Device, dtype: Dtype, opts: BackendOptions) -> Backend:
    from .openvino import OpenVinoBackend

    return OpenVinoBackend(
        model_dir,
        dtype=dtype,
        threads=opts.threads,
        streams=opts.streams,
        cache_dir=opts.cache_dir,
        pixel_norm=opts.pixel_norm,
    )


@dataclass(frozen=True)
class BackendSpec:
    name: BackendName
    #: The module that must be importable (checked without importing it).
    requires: tuple[str, ...]
    dtypes: tuple[Dtype, ...]
    devices: tuple[Device, ...]
    #: Needs the exported ONNX files rather than the safetensors weights.
    needs_onnx: bool
    factory: Callable[[Path, Device, Dtype, BackendOptions], Backend]


REGISTRY: dict[BackendName, BackendSpec] = {
    "torch": BackendSpec("torch", ("torch", "transformers"), ("fp32", "bf16", "fp16"), ("cpu", "cuda"), False, _torch),
    "onnx": BackendSpec("onnx", ("onnxruntime",), ("fp32", "int8"), ("cpu",), True, _onnx),
    "openvino": BackendSpec("openvino", ("openvino",), ("fp32", "bf16", "int8"), ("cpu",), True, _openvino),
}


def create(
    name: BackendName, model_dir: Path, device: Device, dtype: Dtype, opts: BackendOptions | None = None
) -> Backend:
    return REGISTRY[name].factory(model_dir, device, dtype, opts or BackendOptions())


__all__ = [
    "BACKEND_NAMES",
    "DTYPES",
    "ONNX_SUBDIR",
    "REGISTRY",
    "Backend",
    "BackendChoice",
    "BackendName",
    "BackendOptions",
    "BackendSpec",
    "Device",
    "DeviceChoice",
    "Dtype",
    "DtypeChoice",
    "PixelNorm",
    "create",
    "onnx_files_present",
    "onnx_paths",
    "require_module",
]
