"""The readiness canary: a built-in image and caption scored through the same path as requests,
compared with the score recorded when the model loaded.

"The model is loaded" is not "the model works": a peer's health check kept answering 200 while its
embeddings were broken. The canary catches a model that answers NaN or garbage, a backend that
fails, and an inference thread that no longer runs (the check times out).
"""

from __future__ import annotations

import base64
import functools
import io
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SimilarityError
from ..types import Record, ScoreResult

CAPTION = "a red circle on a white background"


@functools.cache
def image_uri() -> str:
    """A 224 px PNG of a red circle on white, as a data: URI (no file, no network)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(img).ellipse((40, 40, 184, 184), fill=(220, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class CanaryResult:
    ok: bool
    cosine: float | None
    expected: float | None
    drift: float | None
    tolerance: float
    seconds: float
    at: float  # time.monotonic() of the check
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        body: dict[str, Any] = {
            "cosine": r(self.cosine),
            "expected": r(self.expected),
            "drift": r(self.drift),
            "tolerance": self.tolerance,
            "seconds": round(self.seconds, 4),
            "age_seconds": round(max(0.0, time.monotonic() - self.at), 3),
        }
        if self.reason:
            body["reason"] = self.reason
        return body


class Canary:
    """``score`` scores records the way requests are scored (the server: its batcher) and raises
    ``TimeoutError`` when it cannot within ``timeout`` (a ``SimilarityError`` when it cannot at
    all: the batcher closed). ``record()`` once after the model loads; ``check()`` on every
    ``/readyz`` (a result younger than ``interval`` seconds is reused)."""

    def __init__(
        self,
        score: Callable[[list[Record], float], list[ScoreResult]],
        *,
        tolerance: float = 1e-3,
        interval: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        self._score = score
        self.tolerance = tolerance
        self.interval = interval
        self.timeout = timeout
        self.expected: float | None = None
        self._last: CanaryResult | None = None
        self._lock = threading.Lock()

    def _run(self) -> tuple[float | None, str | None, float]:
        start = time.perf_counter()
        try:
            (result,) = self._score([Record(image_uri(), CAPTION)], self.timeout)
        except TimeoutError:
            return None, f"the canary was not scored within {self.timeout:g} s", time.perf_counter() - start
        except SimilarityError as exc:  # the batcher closed under it (shutting down)
            return None, f"the canary was not scored: {exc}", time.perf_counter() - start
        seconds = time.perf_counter() - start
        if result.error is not None:
            return None, f"the canary row failed: {result.error_text}", seconds
        if result.cosine is None or not math.isfinite(result.cosine):
            return None, f"the canary scored {result.cosine}", seconds
        return result.cosine, None, seconds

    def record(self) -> float:
        """Score the canary and keep the score as what later checks must match."""
        cosine, reason, seconds = self._run()
        if cosine is None:
            raise RuntimeError(reason)
        with self._lock:
            self.expected = cosine
            self._last = CanaryResult(True, cosine, cosine, 0.0, self.tolerance, seconds, time.monotonic())
        return cosine

    def check(self) -> CanaryResult:
        with self._lock:  # one check at a time; the others reuse it
            last = self._last
            if last is not None and last.ok and time.monotonic() - last.at < self.interval:
                return last
            expected = self.expected
            if expected is None:
                return CanaryResult(
                    False, None, None, None, self.tolerance, 0.0, time.monotonic(), "no canary recorded"
                )
            cosine, reason, seconds = self._run()
            drift = None if cosine is None else abs(cosine - expected)
            if reason is None and drift is not None and drift > self.tolerance:
                reason = f"the canary drifted by {drift:.6f} (tolerance {self.tolerance:g})"
            self._last = CanaryResult(
                reason is None, cosine, expected, drift, self.tolerance, seconds, time.monotonic(), reason
            )
            return self._last

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``ApiService``'s readiness hook."""
        result = self.check()
        return result.ok, result.as_dict()
