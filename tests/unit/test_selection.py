"""What ``auto`` runs, as pure logic: CPU flags, installed packages and the files in the model
directory are what differ between machines, so they are set here and the choice is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from similarity import hardware
from similarity.errors import BackendUnavailable
from similarity.model.selection import Selection, resolve


def _model_dir(root: Path, onnx: bool) -> Path:
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "model.safetensors"):
        (root / name).write_text("{}")
    if onnx:
        (root / "onnx").mkdir()
        for name in ("vision.onnx", "text.onnx", "vision.int8.onnx", "text.int8.onnx"):
            (root / "onnx" / name).write_bytes(b"")
    return root


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    (tmp_path / "exported").mkdir()
    return _model_dir(tmp_path / "exported", onnx=True)


@pytest.fixture
def weights_only(tmp_path: Path) -> Path:
    (tmp_path / "weights").mkdir()
    return _model_dir(tmp_path / "weights", onnx=False)


@pytest.mark.parametrize(
    ("native_bf16", "missing", "exported_files", "asked", "expected"),
    [
        (True, (), True, ("auto", "auto", "auto"), ("openvino", "cpu", "bf16")),
        (True, ("openvino",), True, ("auto", "auto", "auto"), ("torch", "cpu", "bf16")),
        (True, (), False, ("auto", "auto", "auto"), ("torch", "cpu", "bf16")),  # OpenVINO reads the ONNX files
        (False, (), True, ("auto", "auto", "auto"), ("onnx", "cpu", "fp32")),
        (False, (), False, ("auto", "auto", "auto"), ("torch", "cpu", "fp32")),
        (True, ("torch", "openvino"), True, ("auto", "auto", "auto"), ("onnx", "cpu", "fp32")),  # the Lambda image
        (True, ("torch",), True, ("auto", "auto", "auto"), ("openvino", "cpu", "bf16")),
        (True, (), True, ("auto", "auto", "fp32"), ("onnx", "cpu", "fp32")),
        (True, (), True, ("auto", "auto", "int8"), ("openvino", "cpu", "int8")),
        (
            False,
            (),
            True,
            ("auto", "auto", "int8"),
            ("onnx", "cpu", "int8"),
        ),  # no VNNI: ONNX Runtime's has kernels for it
        (True, ("openvino",), True, ("auto", "auto", "int8"), ("onnx", "cpu", "int8")),
        (True, (), True, ("onnx", "auto", "int8"), ("onnx", "cpu", "int8")),
        (True, (), True, ("torch", "cpu", "auto"), ("torch", "cpu", "fp32")),
        (True, (), True, ("onnx", "auto", "auto"), ("onnx", "cpu", "fp32")),
        (True, (), True, ("openvino", "auto", "auto"), ("openvino", "cpu", "fp32")),
        (True, (), True, ("auto", "cpu", "bf16"), ("openvino", "cpu", "bf16")),
    ],
)
def test_auto_picks_the_fastest_faithful_backend(
    monkeypatch, exported, weights_only, native_bf16, missing, exported_files, asked, expected
) -> None:
    """CPU flags and installed packages are what differ between machines; the choice is pure logic."""
    monkeypatch.setattr(hardware, "has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(hardware, "has_int8_dot", lambda: native_bf16)  # every bf16 x86 CPU has VNNI
    monkeypatch.setattr(hardware, "has_amx", lambda: False)  # AVX-512 BF16 without AMX (Zen 4)
    monkeypatch.setattr(hardware, "installed", lambda name: name not in missing)
    monkeypatch.setattr(hardware, "cuda_present", lambda: False)
    backend, device, dtype = asked
    assert resolve(backend, device, exported if exported_files else weights_only, dtype) == Selection(*expected)


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        (("auto", "auto", "auto"), ("torch", "cuda", "fp16")),
        (("torch", "cuda", "auto"), ("torch", "cuda", "fp16")),  # the ECS GPU task's settings
        (("auto", "cpu", "auto"), ("openvino", "cpu", "bf16")),  # --device cpu on a GPU machine
        (("auto", "auto", "int8"), ("openvino", "cpu", "int8")),
        (("torch", "auto", "auto"), ("torch", "cuda", "fp16")),  # SIMILARITY_BACKEND=torch alone
        (("auto", "auto", "fp32"), ("torch", "cuda", "fp32")),  # --dtype fp32 means fp32 on the GPU too
    ],
)
def test_auto_on_a_gpu_machine(monkeypatch, exported, asked, expected) -> None:
    monkeypatch.setattr(hardware, "has_native_bf16", lambda: True)
    monkeypatch.setattr(hardware, "has_int8_dot", lambda: True)
    monkeypatch.setattr(hardware, "has_amx", lambda: False)
    monkeypatch.setattr(hardware, "cuda_present", lambda: True)
    monkeypatch.setattr(hardware, "installed", lambda name: True)
    assert resolve(asked[0], asked[1], exported, asked[2]) == Selection(*expected)


@pytest.mark.parametrize("missing", [(), ("openvino",)])
def test_int8_alone_is_refused_where_amx_makes_bf16_faster(monkeypatch, exported, missing) -> None:
    """On AMX CPUs no int8 path was consistently faster than the bf16 default: --dtype int8 alone says so,
    with the figures, and a named backend still runs it."""
    monkeypatch.setattr(hardware, "has_native_bf16", lambda: True)
    monkeypatch.setattr(hardware, "has_int8_dot", lambda: True)
    monkeypatch.setattr(hardware, "has_amx", lambda: True)
    monkeypatch.setattr(hardware, "installed", lambda name: name not in missing)
    monkeypatch.setattr(hardware, "cuda_present", lambda: False)
    with pytest.raises(
        BackendUnavailable, match=r"not offered on this CPU.*0\.74x-1\.08x.*--backend onnx --dtype int8"
    ):
        resolve("auto", "auto", exported, "int8")
    assert resolve("onnx", "auto", exported, "int8") == Selection("onnx", "cpu", "int8")
    assert resolve("openvino", "cpu", exported, "int8") == Selection("openvino", "cpu", "int8")
    expected = ("torch", "cpu", "bf16") if missing else ("openvino", "cpu", "bf16")
    assert resolve("auto", "auto", exported, "auto") == Selection(*expected)  # the default is untouched


def test_cpu_feature_key_names_the_kernel_flags(monkeypatch) -> None:
    """Compiled-graph caches are kept per key: CPUs that differ in a kernel flag get different keys,
    flags no kernel depends on do not matter, and unreadable flags give one generic key."""
    keys = {}
    for name, flags in {
        "amx": {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"},
        "amx+noise": {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "hypervisor", "ht"},
        "zen4": {"avx512f", "avx512_bf16", "avx512_vnni", "fma"},
        "none": set(),
    }.items():
        monkeypatch.setattr(hardware, "cpu_flags", lambda f=flags: frozenset(f))
        hardware.cpu_feature_key.cache_clear()
        keys[name] = hardware.cpu_feature_key()
    hardware.cpu_feature_key.cache_clear()
    assert keys["amx"] == keys["amx+noise"] != keys["zen4"]
    assert keys["none"] == "generic"


def test_cpu_feature_detection_reads_cpu_flags() -> None:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    assert hardware.has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))
    assert hardware.has_int8_dot() == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
    assert hardware.has_amx() == ("amx_bf16" in flags)


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        (("onnx", "cpu", "bf16"), "onnx backend supports fp32 or int8, not bf16"),
        (("openvino", "cuda", "auto"), "openvino backend runs on cpu, not cuda"),
        (("torch", "cpu", "int8"), "torch backend supports fp32, bf16 or fp16, not int8"),
        (("tpu", "cpu", "auto"), "unknown backend 'tpu' \\(auto, torch, onnx or openvino\\)"),
        (("auto", "npu", "auto"), "unknown device 'npu'"),
        # Before: auto answered cpu for cuda + int8, and ran fp16 on the CPU at a quarter of fp32's speed.
        (("auto", "cuda", "int8"), "int8 runs on the CPU only"),
        (("auto", "auto", "fp16"), "fp16 is for cuda"),
        (("torch", "cpu", "fp16"), "fp16 is for cuda"),
    ],
)
def test_combinations_no_backend_offers_are_refused(monkeypatch, exported, asked, message) -> None:
    monkeypatch.setattr(hardware, "cuda_present", lambda: False)
    with pytest.raises(BackendUnavailable, match=message):
        resolve(asked[0], asked[1], exported, asked[2])


def test_nothing_installed_names_the_extra(monkeypatch, exported) -> None:
    monkeypatch.setattr(hardware, "installed", lambda name: False)
    monkeypatch.setattr(hardware, "cuda_present", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"pip install '\.\[cpu\]'"):
        resolve("auto", "auto", exported, "auto")


@pytest.mark.parametrize(
    ("machine", "flags", "refused"),
    [
        ("x86_64", {"avx2", "fma"}, True),  # Zen 3, Skylake: emulated bf16
        ("x86_64", {"avx512f", "avx512_bf16"}, False),  # Zen 4/5
        ("x86_64", {"avx512f", "amx_bf16"}, False),  # Sapphire Rapids and later
        ("aarch64", set(), False),  # flags not read there: not judged
    ],
)
def test_bf16_is_refused_where_x86_emulates_it(monkeypatch, exported, machine, flags, refused) -> None:
    """torch on a 2-vCPU Zen 3 ran bf16 at a fifth of fp32's speed: asking for it there is a clear
    error naming --dtype fp32, for every backend, while auto keeps picking fp32."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    monkeypatch.setattr(hardware, "cuda_present", lambda: False)
    monkeypatch.setattr(hardware, "installed", lambda name: True)
    for backend in ("torch", "openvino", "auto"):
        if refused:
            with pytest.raises(BackendUnavailable, match=r"no native bf16.*use --dtype fp32"):
                resolve(backend, "cpu", exported, "bf16")
        else:
            assert resolve(backend, "cpu", exported, "bf16").dtype == "bf16"
    assert resolve("auto", "auto", exported, "auto").dtype == ("fp32" if refused or machine != "x86_64" else "bf16")
