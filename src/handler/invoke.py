"""Run a handler on an event file exactly as Lambda would, without Docker:

    python -m handler.invoke handler.api events/api_score.json [--timeout 29]

Prints the handler's response as JSON. The context carries a real deadline, so code that checks
``get_remaining_time_in_millis()`` behaves as in Lambda.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class LocalContext:
    """The attributes of ``LambdaContext`` that handlers and powertools use."""

    timeout_s: float = 29.0
    function_name: str = "local"
    memory_limit_in_mb: int = 4096
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = "/aws/lambda/local"
    log_stream_name: str = "local"
    _deadline: float = 0.0

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_s
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m handler.invoke", description=__doc__.splitlines()[0])
    ap.add_argument("module", help="handler module, e.g. handler.api (its lambda_handler is called)")
    ap.add_argument("event", help="event JSON file, e.g. events/api_score.json")
    ap.add_argument("--timeout", type=float, default=29.0, help="seconds until the simulated Lambda deadline")
    args = ap.parse_args(argv)
    with open(args.event, encoding="utf-8") as fh:
        event = json.load(fh)
    handler = importlib.import_module(args.module).lambda_handler
    response = handler(event, LocalContext(timeout_s=args.timeout, function_name=args.module.rsplit(".", 1)[-1]))
    json.dump(response, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
