"""``local_ray`` twice in one process, the first time with Serve started (as the Ray Serve and Ray
Data test modules run in one pytest process): ray.init turns token auth on and caches the token it
made, so the second cluster's GCS must still be handed that token, and Ray's variables are put back."""

from __future__ import annotations

import os
import socket

import pytest

from similarity.engines.local import local_ray  # first: it sets Ray's environment before ray is imported

pytest.importorskip("ray.serve", reason="the [ray-serve] extra is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_second_local_cluster_starts_after_serve_ran_in_the_first() -> None:
    before = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}
    with local_ray(1):
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        serve.shutdown()
    assert {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")} == before
    with local_ray(1) as info:  # timed out waiting for the GCS before the fix
        import ray

        assert info["node_ip_address"] == "127.0.0.1"
        assert ray.get(ray.put(41)) + 1 == 42
