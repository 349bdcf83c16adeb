"""``ratelimit``: token-bucket limits per identity and per client address."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from authproxy.context import ClientAddress, identity_of, refuse, register_secret
from authproxy.errors import ConfigError

from .buckets import BackendError, Buckets, MemoryBuckets, Rate, parse_rate

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["RateLimit"]
__version__ = "0.1.0"

log = logging.getLogger("authproxy.ratelimit")


class RateLimit:
    """Limit requests per identity and per client address (token buckets), answering 429.

    :param per_identity: e.g. ``"600/minute"``: for each verified identity (the
        email, or a service token's name); requests without one are not counted here.
        Put this step after the identity step.
    :param per_address: e.g. ``"60/minute"``: for each client address, found as
        the access log finds it.
    :param identity_burst: bucket size for ``per_identity`` (default: its count).
    :param address_burst: bucket size for ``per_address`` (default: its count).
    :param backend: ``"memory"`` (per process: with N workers a client gets up
        to N times the limit) or ``"redis"`` (shared by every worker and replica).
    :param redis_url: ``redis://[:password@]host:port/db`` (or ``rediss://``), for
        the redis backend.
    :param redis_timeout: seconds to wait for Redis before giving up on it.
    :param key_prefix: prefix of the Redis keys.
    :param fail_open: when Redis cannot be reached, let requests through (and
        warn, at most once a minute); off: answer 503.
    :param trusted_proxies: as the access log's option (unset: follow the access log).
    :param client_ip_header: as the access log's option (unset: follow the access log).

    A refused request gets ``429 Too Many Requests`` with ``Retry-After`` (whole
    seconds) and the access log records ``rate limited: identity`` or
    ``rate limited: address``. A request takes a token from every bucket that
    applies, or from none when one of them is empty.

    Example::

        [[pipeline]]
        use = "ratelimit"
        per_identity = "600/minute"
        per_address = "120/minute"
        backend = "redis"
        redis_url = "redis://redis.authproxy.svc:6379/0"
    """

    def __init__(
        self,
        app: WSGIApplication,
        /,
        *,
        per_identity: str | None = None,
        per_address: str | None = None,
        identity_burst: int | None = None,
        address_burst: int | None = None,
        backend: Literal["memory", "redis"] = "memory",
        redis_url: str | None = None,
        redis_timeout: float = 0.5,
        key_prefix: str = "authproxy:ratelimit:",
        fail_open: bool = True,
        trusted_proxies: list[str] | None = None,
        client_ip_header: str | None = None,
    ) -> None:
        if per_identity is None and per_address is None:
            raise ConfigError("per_identity", "set per_identity, per_address or both")
        self.app = app
        self.per_identity: Rate | None = None
        self.per_address: Rate | None = None
        if per_identity is not None:
            self.per_identity = parse_rate(per_identity, identity_burst, "per_identity")
        if per_address is not None:
            self.per_address = parse_rate(per_address, address_burst, "per_address")
        self.client = ClientAddress(
            trusted_proxies=trusted_proxies, client_ip_header=client_ip_header
        )
        if redis_timeout <= 0:
            raise ConfigError("redis_timeout", f"expected seconds > 0, got {redis_timeout!r}")
        self.backend = backend
        self.fail_open = fail_open
        self._warned_at = -math.inf
        self.buckets: Buckets
        if backend == "redis":
            if not redis_url:
                raise ConfigError("redis_url", 'required with backend = "redis"')
            parts = urlsplit(redis_url)
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise ConfigError("redis_url", "expected a redis://, rediss:// or unix:// URL")
            if parts.password:
                register_secret(parts.password)
            try:
                from .redis_backend import RedisBuckets
            except ImportError:
                raise ConfigError(
                    "backend",
                    "the redis backend needs the redis package: "
                    "pip install 'authproxy-ratelimit[redis]'",
                ) from None
            self.buckets = RedisBuckets(redis_url, prefix=key_prefix, timeout=redis_timeout)
        else:
            if redis_url is not None:
                raise ConfigError("redis_url", 'only used with backend = "redis"')
            self.buckets = MemoryBuckets()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        claims: list[tuple[str, Rate]] = []
        kinds: list[str] = []
        if self.per_identity is not None:
            identity = identity_of(environ)
            if identity is not None:
                claims.append(("identity:" + identity.name, self.per_identity))
                kinds.append("identity")
        if self.per_address is not None:
            claims.append(("address:" + self.client(environ), self.per_address))
            kinds.append("address")
        if not claims:
            return self.app(environ, start_response)
        try:
            wait, empty = self.buckets.take(claims)
        except BackendError as exc:
            if not self.fail_open:
                return refuse(environ, start_response, 503, f"rate limit unavailable: {exc}")
            self._warn(str(exc))
            return self.app(environ, start_response)
        if empty < 0:
            return self.app(environ, start_response)
        retry = str(max(1, math.ceil(wait)))
        return refuse(
            environ,
            start_response,
            429,
            f"rate limited: {kinds[empty]}",
            headers=[("Retry-After", retry)],
        )

    def _warn(self, problem: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60.0:
            self._warned_at = now
            log.warning("rate limit backend unavailable (%s): letting requests through", problem)

    def describe(self) -> dict[str, Any]:
        """What ``authproxy check-config`` shows (never the Redis URL: it may hold a password)."""
        return {
            "per_identity": self.per_identity and self.per_identity.text,
            "per_address": self.per_address and self.per_address.text,
            "backend": self.backend,
            "fail_open": self.fail_open,
        }

    def close(self) -> None:
        self.buckets.close()
