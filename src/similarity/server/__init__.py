"""``similarity serve``: the HTTP API as a long-running server.

``MicroBatcher`` (``batcher``), ``Canary`` (``canary``) and ``ServerServices`` (``services``) need
no web framework; ``app.create_app(services)`` is the FastAPI app over them (the ``serve`` extra),
which other fronts (Ray Serve, KServe) can reuse.
"""

from .batcher import BatcherClosed, BatchObserver, MicroBatcher, QueueFull
from .canary import Canary

__all__ = ["BatchObserver", "BatcherClosed", "Canary", "MicroBatcher", "QueueFull"]
