"""Token buckets in Redis, shared by every worker and replica."""

from __future__ import annotations

import hashlib
from importlib.resources import files
from typing import Any

from .buckets import BackendError, Claims

_SCRIPT = files(__package__).joinpath("bucket.lua").read_text()


class RedisBuckets:
    """Buckets kept in Redis and updated by one Lua script per request (atomic,
    on the server's clock). Bucket keys are hashed, so no email or address is
    stored in Redis. A single Redis (or a primary behind Sentinel) is expected:
    the keys of one request may live in different slots of a cluster.
    """

    def __init__(self, url: str, *, prefix: str, timeout: float) -> None:
        import redis

        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.prefix = prefix
        self._script: Any = self.client.register_script(_SCRIPT)

    def _key(self, key: str) -> str:
        return self.prefix + hashlib.sha256(key.encode()).hexdigest()[:32]

    def take(self, claims: Claims) -> tuple[float, int]:
        keys = [self._key(key) for key, _ in claims]
        args: list[float] = []
        for _, rate in claims:
            args += [rate.per_second, rate.capacity]
        try:
            reply = self._script(keys=keys, args=args)
        except self._errors as exc:
            raise BackendError(type(exc).__name__) from None
        if int(reply[0]) == 1:
            return 0.0, -1
        return float(reply[1]), int(reply[2]) - 1

    def close(self) -> None:
        self.client.close()
