"""``similarity serve``: the parser and the run, registered by ``similarity.cli``.

Flags override the environment (``SERVER_*``, ``CLIP_MODEL_DIR`` and the rest of
docs/configuration.md). Uvicorn's worker processes read the environment, so the flags are written
back into it before they start.
"""

from __future__ import annotations

import argparse
import glob
import logging.config
import os
import shutil
import signal
import tempfile
from typing import Any, cast

from ..config import ServeSettings, load
from ..errors import ConfigError

FLAGS = {"host": "--host", "port": "--port", "workers": "--workers"}
ENV = {"host": "SERVER_HOST", "port": "SERVER_PORT", "workers": "SERVER_WORKERS"}


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the HTTP API (POST /score, /jobs, /healthz, /readyz, /metrics, and the Open Inference Protocol under /v2) with micro-batching",
        description="The Lambda API's routes as a long-running server (FastAPI under uvicorn; the serve extra).",
    )
    s.add_argument("--model", help="model directory (default: $CLIP_MODEL_DIR or models/clip-vit-base-patch32)")
    s.add_argument("--host", help="address to listen on (default: $SERVER_HOST or 127.0.0.1; 0.0.0.0 in a container)")
    s.add_argument("--port", type=int, help="port (default: $SERVER_PORT or 8080; 0 picks a free one, logged)")
    s.add_argument(
        "--workers",
        type=int,
        help="server processes, each with its own model and batcher (default: $SERVER_WORKERS or 1). "
        "Concurrent image downloads per process are SIMILARITY_WORKERS",
    )


def settings_from(args: argparse.Namespace) -> ServeSettings:
    settings = load(ServeSettings).with_overrides("model", {"dir": args.model}, {"dir": "--model"})
    given = {"host": args.host, "port": args.port, "workers": args.workers}
    return cast(ServeSettings, settings.with_overrides("server", given, FLAGS))


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    settings.server.token()  # a missing or weak token file stops here, with the variable's name
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError("similarity serve needs the serve extra: pip install '.[serve,cpu]'") from None
    # The worker processes build their settings from the environment: the flags go there too.
    os.environ["CLIP_MODEL_DIR"] = settings.model.dir
    for field, name in ENV.items():
        os.environ[name] = str(getattr(settings.server, field))
    return serve(settings, uvicorn)


def serve(settings: ServeSettings, uvicorn: Any) -> int:
    from .logs import log_config

    srv = settings.server
    config = log_config(srv.log_level)
    logging.config.dictConfig(config)
    log = logging.getLogger("similarity.server")
    metrics_dir, made = _prometheus_dir() if srv.workers > 1 else (None, False)
    try:
        cfg = uvicorn.Config(
            "similarity.server.app:app_from_env",
            factory=True,
            host=srv.host,
            port=srv.port,
            workers=srv.workers,
            log_config=config,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(srv.graceful_timeout),
            lifespan="on",
        )
        sock = (
            cfg.bind_socket()
        )  # bound here, so the port is known (and logged) with --port 0; served once the app has started
        host, port = sock.getsockname()[:2]
        log.info("bound", extra={"host": host, "port": port, "workers": srv.workers})
        # uvicorn handles SIGTERM and SIGINT itself (graceful shutdown), then raises the signal again
        # against the handlers it found: SIGTERM's default, so the process ends by it (status 143)
        # as a server stopped by a scheduler does, not by the score command's "interrupted" path.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            if srv.workers > 1:
                from uvicorn.supervisors import Multiprocess

                Multiprocess(cfg, sockets=[sock]).run()
            else:
                uvicorn.Server(cfg).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C, after the same graceful shutdown
            return 130
    finally:
        if metrics_dir is not None and made:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _prometheus_dir() -> tuple[str, bool]:
    """An empty directory for the workers' metric files: the environment's (emptied: stale files
    from an earlier run would be added to the totals) or a fresh temporary one."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        return given, False
    made = tempfile.mkdtemp(prefix="similarity-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made, True
