"""``similarity serve``: the HTTP API as a long-running server.

``MicroBatcher`` (``batcher``), ``Canary`` (``canary``) and ``ServerServices`` (``services``) need
no web framework; ``app.create_app(services)`` is the FastAPI app over them (the ``serve`` extra),
which other fronts (Ray Serve, KServe) can reuse. Imported lazily: ``similarity --help`` lists the
``serve`` command without loading any of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batcher import BatcherClosed, BatchObserver, MicroBatcher, QueueFull
    from .canary import Canary

__all__ = ["BatchObserver", "BatcherClosed", "Canary", "MicroBatcher", "QueueFull"]


def __getattr__(name: str) -> Any:
    if name in ("BatchObserver", "BatcherClosed", "MicroBatcher", "QueueFull"):
        from . import batcher

        return getattr(batcher, name)
    if name == "Canary":
        from .canary import Canary

        return Canary
    raise AttributeError(name)
