"""What lives for the whole execution environment: settings, the model, the fetcher, AWS clients.

Created once per container (Lambda reuses it across invocations) and reset only by tests.
"""

from __future__ import annotations

import threading
from typing import Any

from similarity.errors import SimilarityError
from similarity.fetch import Fetcher
from similarity.model import ClipModel, load_model
from similarity.netguard import AddressPolicy

from .config import ServiceSettings

_lock = threading.RLock()
_state: dict[str, Any] = {}


def settings() -> ServiceSettings:
    with _lock:
        if "settings" not in _state:
            _state["settings"] = ServiceSettings.from_env()
        return _state["settings"]


def client(service: str) -> Any:
    """The one place AWS clients are made (boto3 honours AWS_ENDPOINT_URL for local endpoints)."""
    from similarity.clients import make_client

    with _lock:
        key = f"client:{service}"
        if key not in _state:
            _state[key] = make_client(service)
        return _state[key]


def fetcher() -> Fetcher:
    s = settings()
    s3 = client("s3")
    with _lock:
        if "fetcher" not in _state:
            _state["fetcher"] = Fetcher(s.core.fetch, AddressPolicy(s.core.allowed_networks), s3_client=s3)
        return _state["fetcher"]


class ModelUnavailable(SimilarityError):
    code = "model_unavailable"


def model() -> ClipModel:
    """Load once per environment; a failed load is retried on the next call (the mount may be late)."""
    with _lock:
        if "model" in _state:
            return _state["model"]
        s = settings()
        try:
            m = load_model(s.core.model_dir, backend=s.core.backend, device=s.core.device, dtype=s.core.dtype,
                           threads=s.core.threads, streams=s.core.streams)
        except SimilarityError as exc:
            raise ModelUnavailable(str(exc)) from None
        _state["model"] = m
        return m


def model_load_seconds() -> float | None:
    m = _state.get("model")
    return m.info.load_seconds if m is not None else None


def reset() -> None:
    """Tests only: forget everything so the next call reads the environment again."""
    with _lock:
        f = _state.get("fetcher")
        if f is not None:
            f.close()
        _state.clear()


def jobs():  # -> handler.jobs.Jobs
    from .jobs import Jobs

    s = settings()
    return Jobs(settings=s, s3=client("s3"), sqs=client("sqs"), ecs=client("ecs"))
