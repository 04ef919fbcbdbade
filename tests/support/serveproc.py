"""``similarity serve`` in a subprocess on 127.0.0.1, port 0: the port is read from its JSON
``bound`` log line; every stderr line is kept (the tests read the structured logs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = ROOT / "tests" / "fixtures" / "tiny-clip"


def tiny_env(**extra: str) -> dict[str, str]:
    """The tiny CLIP on torch, the guard open to 127.0.0.1 only, canaries never reused."""
    env = {
        **os.environ,
        "CLIP_MODEL_DIR": str(TINY_CLIP),
        "SIMILARITY_BACKEND": "torch",
        "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
        "SERVER_CANARY_INTERVAL": "0",
        "SERVER_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra)
    return env


class Served:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "similarity", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.env = env if env is not None else tiny_env()
        self.lines: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._got_port = threading.Event()

    # -- lifecycle
    def start(self, timeout: float = 60.0) -> Served:
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        threading.Thread(target=self._drain, daemon=True).start()
        end = time.monotonic() + timeout
        while not self._got_port.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-40:]))
        while True:  # bound first; served once the app has started
            try:
                requests.get(self.url + "/healthz", timeout=5)
                return self
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise RuntimeError("the server did not serve:\n" + "\n".join(self.lines[-40:])) from None
                time.sleep(0.05)

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:  # keep reading so the pipe never fills
            self.lines.append(line.rstrip("\n"))
            if self.port is None and '"message": "bound"' in line:
                self.port = int(json.loads(line)["port"])
                self._got_port.set()

    def wait_ready(self, timeout: float = 120.0) -> Served:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("the server never became ready:\n" + "\n".join(self.lines[-40:]))

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Served:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]
