"""Every setting read from the environment, in one place. CLI flags override these."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .fetch import FetchSettings
from .netguard import IPNetwork, parse_networks

DEFAULT_MODEL_DIR = "models/clip-vit-base-patch32"


def env_str(name: str, default: str) -> str:
    """The variable's value, stripped; ``default`` when unset or blank."""
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def env_int(name: str, default: int) -> int:
    return int(env_str(name, str(default)))


def env_float(name: str, default: float) -> float:
    return float(env_str(name, str(default)))


def env_bool(name: str, default: bool) -> bool:
    return env_str(name, "1" if default else "0").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    model_dir: str = DEFAULT_MODEL_DIR
    backend: str = "auto"  # auto | torch | onnx | openvino
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (torch) | int8 (onnx, openvino); see model.resolve_backend
    batch_size: int = 32
    workers: int = 16
    threads: int | None = None  # None: every core
    streams: int | None = None  # None: one per thread (similarity.streams)
    allowed_networks: tuple[IPNetwork, ...] = ()
    fetch: FetchSettings = field(default_factory=FetchSettings)

    def __post_init__(self) -> None:
        for name in ("threads", "streams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")

    @classmethod
    def from_env(cls, allow_local_paths: bool = False) -> Settings:
        """Each variable falls back to the field's default, so defaults are written once."""
        d, f = cls(), FetchSettings()
        threads, streams = env_str("SIMILARITY_THREADS", ""), env_str("SIMILARITY_STREAMS", "")
        fetch = FetchSettings(
            connect_timeout=env_float("SIMILARITY_CONNECT_TIMEOUT", f.connect_timeout),
            read_timeout=env_float("SIMILARITY_READ_TIMEOUT", f.read_timeout),
            deadline=env_float("SIMILARITY_FETCH_DEADLINE", f.deadline),
            max_bytes=env_int("SIMILARITY_MAX_IMAGE_BYTES", f.max_bytes),
            max_retries=env_int("SIMILARITY_MAX_RETRIES", f.max_retries),
            per_host=env_int("SIMILARITY_PER_HOST", f.per_host),
            allow_local_paths=env_bool("SIMILARITY_ALLOW_LOCAL_PATHS", allow_local_paths),
        )
        return cls(
            model_dir=env_str("CLIP_MODEL_DIR", d.model_dir),
            backend=env_str("SIMILARITY_BACKEND", d.backend),
            device=env_str("SIMILARITY_DEVICE", d.device),
            dtype=env_str("SIMILARITY_DTYPE", d.dtype),
            batch_size=env_int("SIMILARITY_BATCH_SIZE", d.batch_size),
            workers=env_int("SIMILARITY_WORKERS", d.workers),
            threads=int(threads) if threads else None,
            streams=int(streams) if streams else None,
            allowed_networks=parse_networks(os.environ.get("SIMILARITY_ALLOWED_NETWORKS")),
            fetch=fetch,
        )
