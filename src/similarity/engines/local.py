"""Spark and Ray started on this machine, reachable from it alone: for tests, benchmarks and trying
the adapters without a cluster. Every protection the engines need to stay on loopback is here,
in one place; nothing else in the project starts an engine.

Spark: ``SPARK_LOCAL_IP`` and the driver's host and bind address are 127.0.0.1 and the UI is off.

Ray (2.60) needs more:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, or ``ray.init`` swaps ``_node_ip_address="127.0.0.1"``
  for the machine's outward address (found by a UDP connect to 8.8.8.8). Ray reads the variable
  once, when it is first imported, so this module sets it on import and ``local_ray`` also sets
  Ray's constant, and refuses to start when it is still on;
- usage stats off, no dashboard;
- the dashboard head, started even with ``include_dashboard=False``, reads
  ``~/ray_bootstrap_config.yaml`` before it checks whether usage stats are on, and when that file is
  missing asks the cloud metadata endpoints (HTTP to 169.254.169.254, a DNS lookup of
  metadata.google.internal) which cloud it runs on. So ``HOME`` points, while ``ray.init`` starts
  its processes, at a temporary directory holding that file with ``provider: {type: local}``
  (which also keeps Ray's generated ``~/.ray`` token there);
- Serve replicas open a gRPC server on ``[::]``, whatever ``http_options`` say: a worker setup
  hook (``loopback_hook``) rewrites wildcard hosts to 127.0.0.1 in every Ray worker.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOOPBACK = "127.0.0.1"

#: The environment every local engine process gets.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
SPARK_ENV = {"SPARK_LOCAL_IP": LOOPBACK, "SPARK_LOCAL_HOSTNAME": "localhost"}

# Before anything imports ray (see the module's doc).
os.environ.update(RAY_ENV)


@contextmanager
def local_spark(
    cores: int = 2,
    env: Mapping[str, str] | None = None,
    conf: Mapping[str, str] | None = None,
    app_name: str = "similarity",
) -> Iterator[SparkSession]:
    """A ``local[cores]`` SparkSession bound to 127.0.0.1, UI off, its scratch files in a temporary
    directory; ``env`` is set for the driver and passed to the Python workers. Stopped on exit."""
    os.environ.update(SPARK_ENV)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # the JVM, started now, passes its environment to the workers
    from pyspark.sql import SparkSession

    tmp = tempfile.mkdtemp(prefix="similarity-spark-")
    builder = (
        SparkSession.builder.master(f"local[{cores}]")
        .appName(app_name)
        .config("spark.driver.host", LOOPBACK)
        .config("spark.driver.bindAddress", LOOPBACK)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(cores))
        .config("spark.local.dir", tmp)
        .config("spark.sql.warehouse.dir", os.path.join(tmp, "warehouse"))
        .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={tmp}")
    )
    for key, value in {**SPARK_ENV, **(env or {})}.items():
        builder = builder.config(f"spark.executorEnv.{key}", value)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def prepare_ray() -> None:
    """Ray's environment and its node-address constant set for loopback, whenever ray was imported."""
    os.environ.update(RAY_ENV)
    from ray._private import ray_constants, services

    # Read once at ray's import: when that came first, the constant still says "find the outward
    # IP", which ray.init would then do (a UDP connect to 8.8.8.8) and use.
    ray_constants.ENABLE_RAY_CLUSTER = False
    if vars(services).get("ray_constants") is not ray_constants or ray_constants.ENABLE_RAY_CLUSTER is not False:
        raise RuntimeError("cannot keep Ray's node address on loopback; not starting it")


@functools.cache
def _process_token() -> str:
    return secrets.token_hex(32)


@contextmanager
def local_ray(
    num_cpus: int = 2,
    env: Mapping[str, str] | None = None,
    object_store_mb: int = 256,
    **init_kwargs: Any,
) -> Iterator[dict[str, Any]]:
    """``ray.init`` of a one-node cluster on 127.0.0.1 with the protections above; ``env`` reaches
    every worker. Yields the address info (``node_ip_address``, ``gcs_address``, ``session_dir``).
    Shut down on exit."""
    prepare_ray()
    import ray

    # ray.init turns token auth on and keeps the token it made (in ~/.ray, the temporary HOME below)
    # cached in this process; a second local cluster's GCS would not find it there. One token per
    # process, handed to every cluster's processes, and Ray's variables put back afterwards.
    ray_vars = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    os.environ["RAY_AUTH_TOKEN"] = _process_token()  # ray.init still sets RAY_AUTH_MODE itself
    # Short: Ray's AF_UNIX socket paths live under it (108 bytes at most).
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    home = Path(tmp) / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    real_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # read by the processes ray.init starts, see the module's doc
    try:
        ctx = ray.init(
            num_cpus=num_cpus,
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            object_store_memory=object_store_mb * 2**20,
            _temp_dir=os.path.join(tmp, "r"),
            runtime_env={
                "worker_process_setup_hook": "similarity.engines.local.loopback_hook",
                "env_vars": {**RAY_ENV, **(env or {})},
            },
            **init_kwargs,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if real_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = real_home
    try:
        info: dict[str, Any] = dict(ctx.address_info)  # type: ignore[attr-defined]
        if info.get("node_ip_address") != LOOPBACK or not str(info.get("gcs_address", "")).startswith(LOOPBACK + ":"):
            raise RuntimeError(f"Ray did not start on {LOOPBACK}: {info}")
        yield info
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k in [k for k in os.environ if k.startswith("RAY_") and k not in ray_vars]:
            del os.environ[k]
        os.environ.update(ray_vars)


def _loopback_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "", "[::0]") else address


def loopback_hook() -> None:
    """Ray worker setup hook: gRPC servers that Ray code opens on a wildcard host listen on
    127.0.0.1 instead (Serve's replicas hard-code ``[::]:0``). Runs before any actor class loads."""
    import ray._common.tls_utils as tls

    original = tls.add_port_to_grpc_server
    if getattr(original, "_similarity_loopback", False):
        return

    def add_port_to_grpc_server(server: Any, address: str) -> Any:
        return original(server, _loopback_address(address))

    add_port_to_grpc_server._similarity_loopback = True  # type: ignore[attr-defined]
    tls.add_port_to_grpc_server = add_port_to_grpc_server
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:
        replica.add_port_to_grpc_server = add_port_to_grpc_server  # type: ignore[attr-defined]
