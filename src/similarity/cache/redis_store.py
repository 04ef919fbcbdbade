"""The shared store: Redis or Valkey (ElastiCache Serverless in the template), for the Lambda
functions, the API and the GPU task.

- every call has ``timeout`` on connect and on each read, and no retries: redis-py 8 otherwise
  retries ten times with backoff, which turned a hung server into seconds per call;
- batches are pipelines of single-key GET/SET, never MGET or MSET, so keys in different hash slots
  work on a cluster-mode endpoint (ElastiCache Serverless) as on one server;
- every entry gets an expiry (``entry_ttl``), so the server's eviction (``volatile-*`` policies,
  Serverless at its storage limit) and time both bound what stays;
- keys carry the ``tis:`` prefix; ``clear`` deletes those and nothing else on a shared server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .store import KINDS, StoreStats, StoreUnavailable

PREFIX = "tis:"


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    def __init__(self, url: str, timeout: float = 0.25, entry_ttl: int = 30 * 86400) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise StoreUnavailable(
                "the redis package is not installed (pip install 'text-image-similarity[cache]')"
            ) from None
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.name = redacted(url)
        self.entry_ttl = entry_ttl
        try:
            self._client: Any = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                health_check_interval=0,
                client_name="text-image-similarity",
            )
        except (ValueError, *self._errors) as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from None

    def _fail(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"{self.name}: {type(exc).__name__}: {exc}")

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.get(PREFIX + k)
            values = pipe.execute()
        except self._errors as exc:
            raise self._fail(exc) from None
        return [v if isinstance(v, bytes) else None for v in values]

    def put_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for k, v in items.items():
                pipe.set(PREFIX + k, v, ex=self.entry_ttl)
            pipe.execute()
        except self._errors as exc:
            raise self._fail(exc) from None

    def _keys(self) -> list[bytes]:
        return list(self._client.scan_iter(match=PREFIX + "*", count=1000))

    def stats(self) -> StoreStats:
        try:
            keys = self._keys()
            memory = self._client.info("memory")
        except self._errors as exc:
            raise self._fail(exc) from None
        counts = dict.fromkeys(KINDS.values(), 0)
        for k in keys:
            kind = KINDS.get(k[len(PREFIX) : len(PREFIX) + 1].decode(errors="replace"))
            if kind is not None:
                counts[kind] += 1
        extra = {"server_used_memory": memory.get("used_memory"), "server_maxmemory": memory.get("maxmemory")}
        return StoreStats(store=self.name, entries=counts, extra=extra)

    def clear(self) -> int:
        try:
            keys = self._keys()
            for i in range(0, len(keys), 500):
                pipe = self._client.pipeline(transaction=False)
                for k in keys[i : i + 500]:
                    pipe.unlink(k)
                pipe.execute()
        except self._errors as exc:
            raise self._fail(exc) from None
        return len(keys)

    def close(self) -> None:
        try:
            self._client.close()
        except self._errors:
            pass
