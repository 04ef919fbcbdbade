"""moto's Lambda as the IAM tests need it: invokes that run nothing (moto's "simple" backend; its
Docker-run functions are unavailable here), each recorded so the test can hand the payload to the
handler itself, and authorised as AWS authorises them. Where moto differs from AWS:

  invoke_action    moto checks Invoke as lambda:Invoke; AWS checks lambda:InvokeFunction.
  invoke_resource  moto authorises Lambda against Resource "*", so a statement scoped to a
                   function's ARN never matches; AWS authorises Invoke against the function's ARN.

State is process-wide (ThreadedMotoServer runs in this process), so ``install`` returns its undo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote


@dataclass
class Invokes:
    """Every invoke moto answered since ``install``: the function name, the invocation type, the payload."""

    calls: list[tuple[str, str, bytes]] = field(default_factory=list)

    def take(self) -> list[tuple[str, str, bytes]]:
        taken, self.calls[:] = list(self.calls), []
        return taken


def install() -> tuple[Invokes, Callable[[], None]]:
    from moto.awslambda import responses as lr
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from moto.core.config import default_user_config
    from moto.iam import access_control

    invokes = Invokes()
    undo: list[Callable[[], None]] = []

    saved_config = dict(default_user_config["lambda"])
    default_user_config["lambda"]["use_docker"] = False
    undo.append(lambda: default_user_config["lambda"].update(saved_config))

    orig_invoke = LambdaSimpleBackend.invoke

    def invoke(self: Any, function_name: str, qualifier: Any, body: Any, headers: Any, response_headers: Any) -> Any:
        self.get_function(function_name, qualifier)  # an unknown function is a 404, as in AWS
        kind = str(headers.get("X-Amz-Invocation-Type", "RequestResponse"))
        invokes.calls.append((function_name, kind, body if isinstance(body, bytes) else str(body).encode()))
        return orig_invoke(self, function_name, qualifier, body, headers, response_headers)

    LambdaSimpleBackend.invoke = invoke  # type: ignore[method-assign]
    undo.append(lambda: setattr(LambdaSimpleBackend, "invoke", orig_invoke))

    # invoke_action
    orig_init = access_control.IAMRequestBase.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        orig_init(self, *a, **kw)
        if self._action == "lambda:Invoke":
            self._action = "lambda:InvokeFunction"

    access_control.IAMRequestBase.__init__ = init  # type: ignore[method-assign]
    undo.append(lambda: setattr(access_control.IAMRequestBase, "__init__", orig_init))

    # invoke_resource
    cls = lr.LambdaResponse
    had = "_determine_resource" in cls.__dict__

    def _determine_resource(self: Any) -> str:
        if self.path.rstrip("/").endswith("/invocations"):
            name = unquote(self.path.rstrip("/").rsplit("/", 2)[-2])
            if name.startswith("arn:"):
                return name
            return f"arn:aws:lambda:{self.region}:{self.current_account}:function:{name}"
        return "*"

    cls._determine_resource = _determine_resource  # type: ignore[attr-defined]
    undo.append(lambda: None if had else delattr(cls, "_determine_resource"))

    def uninstall() -> None:
        for u in reversed(undo):
            u()

    return invokes, uninstall
