"""The OpenAPI document of ``similarity serve``, as committed in docs/openapi.json.

    python -m similarity.server.openapi docs/openapi.json     # regenerate after changing a route or body

It depends on no setting (limits are runtime values, described in words), so the committed file
and a running server's ``/openapi.json`` are the same document.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def document() -> dict[str, Any]:
    from ..bootstrap import build
    from ..config import ServeSettings
    from .app import create_app
    from .services import ServerServices

    settings = ServeSettings.model_validate({})
    services = ServerServices(settings, runtime=build(settings, local_paths=False))
    try:
        return create_app(services, manage=False).openapi()
    finally:
        services.runtime.close()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args and args[0] != "-":
        with open(args[0], "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
