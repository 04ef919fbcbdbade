"""What this machine offers: usable cores, CPU features, a CUDA device, installed packages.

Every probe is cheap and never imports torch unless an NVIDIA driver is present (importing it
costs ~1 s of cold start). Works on Linux, macOS and Windows.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any


def cpu_count() -> int:
    """Cores this process may run on (the cgroup's CPU set on Linux, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty elsewhere), read once per process."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    """x86 CPUs with bf16 dot-product instructions (AVX-512 BF16 or AMX); elsewhere bf16 would be
    emulated and slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def bf16_emulated() -> bool:
    """An x86 CPU without native bf16, where bf16 math is emulated in fp32 units: slower than fp32
    itself. Other architectures are not judged here (their flags are not read)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and not has_native_bf16()


def has_amx() -> bool:
    """Intel CPUs with AMX tiles (Sapphire Rapids and later): no int8 path measured faster than
    bf16 there (docs/performance.md)."""
    return "amx_bf16" in cpu_flags()


#: Flag prefixes that decide which kernels a compiler (OpenVINO's CPU plugin) emits.
_KERNEL_FLAGS = ("avx", "amx", "fma", "f16c", "sse4", "ssse3", "bmi", "vnni")


@functools.cache
def cpu_feature_key() -> str:
    """A short key of the CPU features compiled kernels depend on: caches of compiled graphs are
    kept per key, so hosts of different CPU types sharing one directory (Lambda over EFS) never
    hand each other kernels their CPU lacks. "generic" where the flags cannot be read."""
    wanted = sorted(f for f in cpu_flags() if f.startswith(_KERNEL_FLAGS))
    if not wanted:
        return "generic"
    return hashlib.sha256(" ".join(wanted).encode()).hexdigest()[:12]


def has_int8_dot() -> bool:
    """x86 CPUs with int8 dot-product instructions (VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def import_torch() -> Any:
    if "torch" not in sys.modules:
        # OpenMP workers that spin between model calls take the cores our decode threads need
        # (+13% end to end when they sleep). Read once, when torch loads its OpenMP runtime.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


def cuda_present() -> bool:
    if not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()):
        return False
    try:
        return bool(import_torch().cuda.is_available())
    except ImportError:
        return False


def memory_limit_bytes(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int:
    """The memory this process may use: the least of its cgroup's limit (v2 ``memory.max`` of its
    own group or the root, v1 ``memory.limit_in_bytes``) and the machine's physical memory. In
    Lambda that is the function's memory size. 4 GiB when nothing can be read."""
    root = Path(cgroup_root)
    candidates = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            for line in fh:
                hierarchy, _, rest = line.strip().partition(":")
                controllers, _, group = rest.partition(":")
                if hierarchy == "0" and group not in ("", "/"):  # cgroup v2: our own group
                    candidates.insert(0, root / group.lstrip("/") / "memory.max")
                elif "memory" in controllers.split(",") and group not in ("", "/"):
                    candidates.insert(0, root / "memory" / group.lstrip("/") / "memory.limit_in_bytes")
    except OSError:
        pass
    limits: list[int] = []
    for path in candidates:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and 0 < int(value) < 1 << 60:  # "max" or v1's huge "no limit" value
            limits.append(int(value))
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        pass
    return min(limits) if limits else 4 << 30
