"""One image's loading, the same in the scorer's threads and in its worker processes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..cache import Hit, Miss, RunCache
from ..errors import InternalError, RowError
from ..fetch import Fetcher

log = logging.getLogger(__name__)

#: What loading one URL gives: the model's input, or why there is none; with a cache, the cached
#: embedding (``Hit``) or the input and where its embedding goes (``Miss``).
Loaded = np.ndarray | RowError | Hit | Miss


def load_image(url: str, fetcher: Fetcher, pixels: Callable[[bytes], np.ndarray], cache: RunCache | None) -> Loaded:
    """Fetch and decode ``url`` (asking ``cache`` first); every failure is the row's error."""
    try:
        if cache is not None:
            return cache.load_image(url, fetcher, pixels)
        return pixels(fetcher.fetch(url))
    except RowError as exc:
        return exc
    except Exception as exc:  # contained to the row: a bug, logged, must not end the run
        log.exception("unexpected error loading %s", url[:200])
        return InternalError(f"{type(exc).__name__} while loading image")
