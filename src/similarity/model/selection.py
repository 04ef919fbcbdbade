"""Which backend, device and precision run: the one place ``auto`` is decided and combinations are
checked.

``auto``/``auto`` picks the fastest path whose similarities stay within 0.002 of fp32 (bench/ and
the backend tests measure it): CUDA torch fp16 on a GPU; on a CPU with native bf16, mixed bf16
with OpenVINO (needs the exported ONNX files) or else torch; else ONNX Runtime fp32 when the
exported files and onnxruntime are present (the Lambda image, which has neither torch nor
OpenVINO); else torch fp32. Naming a backend without a dtype gives its fp32 path (fp16 on CUDA);
``--dtype fp32`` runs fp32 on CUDA too. int8 is never picked: it is opt-in, and ``--dtype int8``
gets OpenVINO's int8 where the CPU has VNNI, else ONNX Runtime's; on CPUs with AMX, where bf16 is
no int8 path measured faster, ``--dtype int8`` alone is refused with the figures (a named
backend, ``--backend onnx --dtype int8``, still runs it). bf16 on an x86 CPU without native bf16
is refused for every backend: it would be emulated, slower than fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from .. import hardware
from ..backends import (
    REGISTRY,
    BackendChoice,
    BackendName,
    Device,
    DeviceChoice,
    Dtype,
    DtypeChoice,
    onnx_files_present,
)
from ..errors import BackendUnavailable
from .directory import has_weights

#: Why ``--dtype int8`` alone is refused on CPUs with AMX, with what was measured there.
INT8_ON_AMX = (
    "--dtype int8 is not offered on this CPU: it has AMX, where no int8 path was consistently faster than the "
    "bf16 default (OpenVINO dynamic int8 at 0.74x-1.08x its speed end to end in two runs on a 2-vCPU "
    "Xeon with AMX, family 6 model 207), with 2-3x its drift (docs/performance.md). Leave --dtype at auto, "
    "or name the backend to run int8 anyway: --backend onnx --dtype int8 (or --backend openvino)"
)

#: Why bf16 is refused on x86 CPUs without native bf16, with what was measured there.
BF16_EMULATED = (
    "--dtype bf16 is not offered on this CPU: it has no native bf16 (AVX-512 BF16 or AMX), so bf16 would be "
    "emulated, at a fifth of fp32's speed (torch on a 2-vCPU Zen 3: 1.9 against 9.9 pairs/s end to end, "
    "docs/performance.md); use --dtype fp32, or leave --dtype at auto"
)


@dataclass(frozen=True)
class Selection:
    backend: BackendName
    device: Device
    dtype: Dtype

    def as_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype}


def runnable(name: BackendName, model_dir: Path) -> bool:
    """The backend's packages are installed and the files it reads are in the directory."""
    spec = REGISTRY[name]
    if not all(hardware.installed(m) for m in spec.requires):
        return False
    return onnx_files_present(model_dir) if spec.needs_onnx else has_weights(model_dir)


def _auto_backend(
    device: DeviceChoice, dtype: DtypeChoice, model_dir: Path
) -> tuple[BackendName, DeviceChoice, DtypeChoice]:
    bf16_cpu = dtype in ("auto", "bf16") and device in ("auto", "cpu") and hardware.has_native_bf16()
    if dtype == "int8":
        if device == "cuda":
            raise BackendUnavailable("int8 runs on the CPU only (onnx or openvino): use --device cpu, or fp16 on cuda")
        if hardware.has_amx():
            raise BackendUnavailable(INT8_ON_AMX)
        ov_int8 = hardware.has_int8_dot() and runnable("openvino", model_dir)
        return ("openvino" if ov_int8 else "onnx"), "cpu", dtype
    if device == "cuda" or (device == "auto" and hardware.cuda_present()):
        return "torch", "cuda", dtype
    if bf16_cpu and runnable("openvino", model_dir):
        return "openvino", "cpu", "bf16"
    if bf16_cpu and runnable("torch", model_dir):
        return "torch", "cpu", "bf16"
    if dtype in ("auto", "fp32") and runnable("onnx", model_dir):
        return "onnx", device, dtype
    if runnable("torch", model_dir):
        return "torch", device, dtype
    if dtype in ("auto", "fp32") and runnable("openvino", model_dir):  # no torch, no onnxruntime
        return "openvino", "cpu", dtype
    if all(hardware.installed(m) for m in REGISTRY["torch"].requires):
        return "torch", device, dtype  # the weights are missing: loading says which file
    raise BackendUnavailable(
        "no backend can run this model here: install an extra (pip install '.[cpu]' runs the exported "
        "ONNX files; '.[torch]' runs the safetensors weights) and, for ONNX, run `similarity model export`"
    )


def resolve(backend: BackendChoice, device: DeviceChoice, model_dir: Path, dtype: DtypeChoice = "auto") -> Selection:
    """What ``load_model`` will run for these choices on this machine; raises ``BackendUnavailable``
    for a combination no backend offers."""
    _known("backend", backend, ("auto", *REGISTRY))
    _known("device", device, get_args(DeviceChoice))
    _known("dtype", dtype, get_args(DtypeChoice))
    if backend == "auto":
        backend, device, dtype = _auto_backend(device, dtype, model_dir)
    spec = REGISTRY[backend]
    if device == "auto":
        device = "cuda" if backend == "torch" and hardware.cuda_present() else "cpu"
    if dtype == "auto":
        dtype = "fp16" if device == "cuda" else "fp32"
    if device not in spec.devices:
        raise BackendUnavailable(f"{backend} backend runs on {_either(spec.devices)}, not {device}")
    if dtype not in spec.dtypes:
        raise BackendUnavailable(f"{backend} backend supports {_either(spec.dtypes)}, not {dtype}")
    if dtype == "bf16" and device == "cpu" and hardware.bf16_emulated():
        raise BackendUnavailable(BF16_EMULATED)
    if dtype == "fp16" and device == "cpu":
        # torch runs fp16 on the CPU without fast kernels: about 4x slower than fp32, for no gain.
        raise BackendUnavailable("fp16 is for cuda; on the CPU use fp32, or bf16 where the CPU has it")
    return Selection(backend, device, dtype)


def _either(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _known(what: str, value: str, allowed: tuple[str, ...]) -> None:
    # Literal types are not checked at run time; library callers may pass any string.
    if value not in allowed:
        raise BackendUnavailable(f"unknown {what} {value!r} ({_either(allowed)})")
