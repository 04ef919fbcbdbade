"""The API's routes, matched without a framework: 404 for an unknown path, 405 (with the methods
it does take) for a known path asked with another method."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from .errors import MethodNotAllowed, NotFound

RouteName = Literal["score", "start_job", "job_status", "healthz", "readyz"]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    name: RouteName

    @property
    def pattern(self) -> re.Pattern[str]:
        return template_pattern(self.template)


def template_pattern(template: str) -> re.Pattern[str]:
    """``/jobs/{id}`` -> a regex with one named group per ``{param}`` (one path segment each)."""
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$")


ROUTES: tuple[Route, ...] = (
    Route("POST", "/score", "score"),
    Route("POST", "/jobs", "start_job"),
    Route("GET", "/jobs/{id}", "job_status"),
    Route("GET", "/healthz", "healthz"),
    Route("GET", "/readyz", "readyz"),
)
_COMPILED = tuple((r, r.pattern) for r in ROUTES)


class Routed(Protocol):
    @property
    def method(self) -> str: ...


R = TypeVar("R", bound=Routed)


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for ``method path`` and its path parameters."""
    return find(_COMPILED, method, path)


def find(table: Sequence[tuple[R, re.Pattern[str]]], method: str, path: str) -> tuple[R, dict[str, str]]:
    """``match`` over any route table (the Open Inference Protocol's has its own)."""
    method = method.upper()
    allowed: list[str] = []
    for route, pattern in table:
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
