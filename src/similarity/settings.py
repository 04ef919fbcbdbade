"""Every setting read from the environment, in one place. CLI flags override these."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .fetch import FetchSettings
from .netguard import IPNetwork, parse_networks

DEFAULT_MODEL_DIR = "models/clip-vit-base-patch32"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    model_dir: str = DEFAULT_MODEL_DIR
    backend: str = "auto"  # auto | torch | onnx
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # torch: fp32 | bf16 | fp16; onnx: fp32 | int8
    batch_size: int = 32
    workers: int = 16
    threads: int | None = None
    allowed_networks: tuple[IPNetwork, ...] = ()
    fetch: FetchSettings = field(default_factory=FetchSettings)

    @classmethod
    def from_env(cls, allow_local_paths: bool = False) -> Settings:
        threads = _env("SIMILARITY_THREADS", "")
        fetch = FetchSettings(
            connect_timeout=float(_env("SIMILARITY_CONNECT_TIMEOUT", "5")),
            read_timeout=float(_env("SIMILARITY_READ_TIMEOUT", "10")),
            deadline=float(_env("SIMILARITY_FETCH_DEADLINE", "30")),
            max_bytes=int(_env("SIMILARITY_MAX_IMAGE_BYTES", str(20 * 1024 * 1024))),
            max_retries=int(_env("SIMILARITY_MAX_RETRIES", "2")),
            per_host=int(_env("SIMILARITY_PER_HOST", "8")),
            allow_local_paths=_bool("SIMILARITY_ALLOW_LOCAL_PATHS", allow_local_paths),
        )
        return cls(
            model_dir=_env("CLIP_MODEL_DIR", DEFAULT_MODEL_DIR),
            backend=_env("SIMILARITY_BACKEND", "auto"),
            device=_env("SIMILARITY_DEVICE", "auto"),
            dtype=_env("SIMILARITY_DTYPE", "fp32"),
            batch_size=int(_env("SIMILARITY_BATCH_SIZE", "32")),
            workers=int(_env("SIMILARITY_WORKERS", "16")),
            threads=int(threads) if threads else None,
            allowed_networks=parse_networks(os.environ.get("SIMILARITY_ALLOWED_NETWORKS")),
            fetch=fetch,
        )
