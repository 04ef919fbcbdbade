"""The API's routes, matched without a framework: 404 for an unknown path, 405 (with the methods
it does take) for a known path asked with another method."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import MethodNotAllowed, NotFound

RouteName = Literal["score", "start_job", "job_status", "healthz", "readyz"]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    name: RouteName

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template) + "$")


ROUTES: tuple[Route, ...] = (
    Route("POST", "/score", "score"),
    Route("POST", "/jobs", "start_job"),
    Route("GET", "/jobs/{id}", "job_status"),
    Route("GET", "/healthz", "healthz"),
    Route("GET", "/readyz", "readyz"),
)
_COMPILED = tuple((r, r.pattern) for r in ROUTES)


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for ``method path`` and its path parameters."""
    method = method.upper()
    allowed: list[str] = []
    for route, pattern in _COMPILED:
        m = pattern.match(path)
        if m is None:
            continue
        if route.method == method:
            return route, m.groupdict()
        allowed.append(route.method)
    shown = (path if len(path) <= 100 else path[:97] + "...").encode("utf-8", "backslashreplace").decode()
    method = method[:20].encode("utf-8", "backslashreplace").decode()
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed on {shown}; use {', '.join(allowed)}", allowed)
    raise NotFound(f"no route {method} {shown}")
