"""``metrics``: Prometheus metrics of the requests that pass this step, on a local path."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from authproxy.context import (
    REFUSAL,
    UPSTREAM_MS,
    CountedBody,
    in_networks,
    parse_networks,
    plain_response,
    refusal_class,
    refuse,
)
from authproxy.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["DEFAULT_BUCKETS", "Metrics"]
__version__ = "0.1.0"

#: Seconds; prometheus-client's defaults plus 30 s and 60 s for slow upstreams.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OTHER = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.-]{1,40}\Z")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Instruments:
    def __init__(self, prefix: str, buckets: tuple[float, ...], registry: Any) -> None:
        self.requests = Counter(
            f"{prefix}_requests",
            "Requests answered, by route class, method and status class.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{prefix}_request_duration_seconds",
            "Time from the request to the end of the response body, by route class.",
            ["route"],
            buckets=buckets,
            registry=registry,
        )
        self.upstream = Histogram(
            f"{prefix}_upstream_duration_seconds",
            "Time to the upstream's response headers, by route class.",
            ["route"],
            buckets=buckets,
            registry=registry,
        )
        self.refusals = Counter(
            f"{prefix}_refusals",
            "Requests refused by a step (identity, ip-allow, ...), by status and reason class.",
            ["status", "reason"],
            registry=registry,
        )
        self.response_bytes = Counter(
            f"{prefix}_response_bytes",
            "Response body bytes sent to clients, by route class.",
            ["route"],
            registry=registry,
        )
        self.request_bytes = Counter(
            f"{prefix}_request_bytes",
            "Request body bytes announced by Content-Length, by route class.",
            ["route"],
            registry=registry,
        )


class Metrics:
    """Prometheus metrics of the requests that pass this step, served on a local path.

    :param path: where the metrics are answered, locally (never forwarded, never counted).
    :param allow_from: CIDR networks of the direct peer allowed to read ``path``
        (e.g. the pod network, which excludes cloudflared's loopback); unset: anyone.
    :param routes: route classes: name -> regular expression searched in the
        path, first match wins; unmatched requests are ``"other"``.
    :param buckets: latency histogram buckets, in seconds.
    :param prefix: metric name prefix.
    :param max_reasons: distinct refusal reason classes kept per process; later ones
        are counted as ``"other"``.

    Metrics: ``<prefix>_requests_total{route,method,status}`` (status class, e.g.
    ``2xx``), ``<prefix>_request_duration_seconds{route}``,
    ``<prefix>_upstream_duration_seconds{route}``,
    ``<prefix>_refusals_total{status,reason}`` (reason class, see
    :func:`authproxy.context.refusal_class`), ``<prefix>_response_bytes_total{route}``
    and ``<prefix>_request_bytes_total{route}``. Every label value comes from a
    bounded set, never from the request itself.

    Under gunicorn with several workers, set ``PROMETHEUS_MULTIPROC_DIR`` to an
    empty directory before starting: each worker then writes its values there
    and any worker answers ``path`` with the sum over all of them.

    Example::

        [[pipeline]]
        use = "metrics"
        routes = { api = "^/api/", assets = "\\\\.(js|css|png|svg|woff2?)$" }
        allow_from = ["10.0.0.0/8"]
    """

    def __init__(
        self,
        app: WSGIApplication,
        /,
        *,
        path: str = "/metrics",
        allow_from: list[str] | None = None,
        routes: dict[str, str] | None = None,
        buckets: list[float] | None = None,
        prefix: str = "authproxy",
        max_reasons: int = 20,
    ) -> None:
        if not path.startswith("/"):
            raise ConfigError("path", f"expected a path starting with '/', got {path!r}")
        if not _METRIC_NAME.match(prefix):
            raise ConfigError("prefix", f"expected a metric name like 'authproxy', got {prefix!r}")
        if max_reasons < 1:
            raise ConfigError("max_reasons", f"expected at least 1, got {max_reasons}")
        self.app = app
        self.path = path
        self.allow_from = None if allow_from is None else parse_networks(allow_from, "allow_from")
        self.routes = _compile_routes(routes or {})
        self.max_reasons = max_reasons
        self._reasons: set[str] = set()
        self._reasons_lock = threading.Lock()
        bounds = _check_buckets(buckets)
        self.multiprocess_dir = _multiprocess_dir()
        # One registry per step in a single process; in multiprocess mode the
        # values go to files and a fresh registry reads them all at each scrape.
        self.registry: CollectorRegistry | None = (
            None if self.multiprocess_dir else CollectorRegistry(auto_describe=True)
        )
        self.instruments = _Instruments(prefix, bounds, self.registry)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self.path:
            return self._expose(environ, start_response)
        started = time.perf_counter()
        route = self._route(path)
        status = [0]

        def start(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[0] = int(line[:3])
            return start_response(line, headers, exc_info)

        try:
            body = self.app(environ, start)
        except BaseException:
            self._record(environ, route, status[0] or 500, started, 0)
            raise
        return CountedBody(
            body,
            lambda sent, _aborted: self._record(environ, route, status[0] or 500, started, sent),
        )

    def _route(self, path: str) -> str:
        for name, pattern in self.routes:
            if pattern.search(path):
                return name
        return OTHER

    def _reason(self, reason: str) -> str:
        label = refusal_class(reason)
        if label in self._reasons:
            return label
        with self._reasons_lock:
            if len(self._reasons) >= self.max_reasons:
                return OTHER
            self._reasons.add(label)
        return label

    def _record(
        self, environ: WSGIEnvironment, route: str, status: int, started: float, sent: int
    ) -> None:
        m = self.instruments
        method = environ.get("REQUEST_METHOD", "")
        method = method if method in _METHODS else OTHER
        m.requests.labels(route, method, f"{status // 100}xx").inc()
        m.duration.labels(route).observe(time.perf_counter() - started)
        upstream_ms = environ.get(UPSTREAM_MS)
        if isinstance(upstream_ms, (int, float)):
            m.upstream.labels(route).observe(upstream_ms / 1000.0)
        reason = environ.get(REFUSAL)
        if isinstance(reason, str):
            m.refusals.labels(str(status), self._reason(reason)).inc()
        m.response_bytes.labels(route).inc(sent)
        length = environ.get("CONTENT_LENGTH")
        if length and length.isdigit():
            m.request_bytes.labels(route).inc(int(length))

    def _expose(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        if self.allow_from is not None and not in_networks(
            environ.get("REMOTE_ADDR", ""), self.allow_from
        ):
            return refuse(environ, start_response, 403, "metrics: address not allowed")
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            return plain_response(start_response, 405, headers=[("Allow", "GET, HEAD")])
        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        data = generate_latest(registry)
        start_response(
            "200 OK",
            [
                ("Content-Type", CONTENT_TYPE_LATEST),
                ("Content-Length", str(len(data))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [] if method == "HEAD" else [data]

    def describe(self) -> dict[str, Any]:
        """What ``authproxy check-config`` shows."""
        return {
            "path": self.path,
            "routes": [name for name, _ in self.routes],
            "multiprocess_dir": self.multiprocess_dir,
            "allow_from": None if self.allow_from is None else [str(n) for n in self.allow_from],
        }


def _compile_routes(routes: dict[str, str]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    compiled = []
    for name, pattern in routes.items():
        if not _LABEL_VALUE.match(name) or name == OTHER:
            raise ConfigError(
                f"routes.{name}", f"expected a name of 1-40 letters, digits, '_.-' (not {OTHER!r})"
            )
        try:
            compiled.append((name, re.compile(pattern)))
        except re.error as exc:
            raise ConfigError(
                f"routes.{name}", f"not a regular expression: {pattern!r} ({exc})"
            ) from None
    return tuple(compiled)


def _check_buckets(buckets: list[float] | None) -> tuple[float, ...]:
    if buckets is None:
        return DEFAULT_BUCKETS
    bounds = tuple(float(b) for b in buckets)
    if not bounds or any(b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ConfigError("buckets", f"expected increasing positive seconds, got {buckets!r}")
    return bounds


def _multiprocess_dir() -> str | None:
    path = os.environ.get(_MULTIPROC_ENV) or os.environ.get(_MULTIPROC_ENV.lower())
    if not path:
        return None
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise ConfigError(_MULTIPROC_ENV, f"expected a writable directory, got {path!r}")
    if values.ValueClass is values.MutexValue:
        raise ConfigError(
            _MULTIPROC_ENV, "was set after prometheus_client was imported; set it before start"
        )
    return path
