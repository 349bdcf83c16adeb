"""The forwarder: the only code that talks to the upstream.

Its TLS and pool configuration comes from a :class:`requests.Session` (verify,
CA bundle, client certificate, pool size), but each request goes straight to
the session adapter's urllib3 pool, below ``requests``' per-call machinery:
that machinery re-encodes the request target, reads redirect bodies, keeps
cookies and adds headers of its own, and a proxy wants none of that.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InsecureRequestWarning
from urllib3.util import SKIP_HEADER

from .errors import (
    ConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .headers import (
    HOP_BY_HOP_NAMES,
    REQUEST_CHUNKED_KEY,
    UPGRADE_KEY,
    connection_tokens,
    header_name,
    sanitize,
)
from .sockets import ClientGone, UpstreamWait
from .tunnel import Tunnel

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("authproxy.forwarder")

UPSTREAM_MS_KEY = "authproxy.upstream_ms"
UPSTREAM_URL_KEY = "authproxy.upstream_url"

#: Bodies up to this size with a known length are read whole before the
#: response starts (one write, and an upstream failure is still a clean 502).
SMALL_BODY = 64 * 1024
#: Always streamed, whatever their length (compared in lower case, parameters ignored).
_STREAMING_TYPES = ("text/event-stream",)
_NO_BODY_STATUS = frozenset({204, 304})
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_GENERIC_BODY = {
    "502 Bad Gateway": b"Bad Gateway\n",
    "504 Gateway Timeout": b"Gateway Timeout\n",
    "400 Bad Request": b"Bad Request\n",
    "411 Length Required": b"Length Required\n",
}


def join_path(base: str, target: str) -> str:
    """Join the upstream's base path and a request target, like Go's singleJoiningSlash.

    >>> join_path("/api/", "/v1?x=1")
    '/api/v1?x=1'
    """
    if not base:
        return target
    if base.endswith("/"):
        return base + target[1:] if target.startswith("/") else base + target
    return base + target if target.startswith("/") else base + "/" + target


def request_target(environ: WSGIEnvironment) -> str | None:
    """The raw path and query the client sent (``%2F`` intact), or None if unusable.

    An absolute-form target (``GET http://other.host/x``) keeps only its path:
    the host it names is never contacted.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/;=,%")
        query = environ.get("QUERY_STRING")
        return path + "?" + query if query else path or "/"
    if raw.startswith("/"):
        return raw
    scheme, sep, rest = raw.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        slash = rest.find("/")
        query = rest.find("?")
        if slash == -1 or (query != -1 and query < slash):
            return "/" + rest[query:] if query != -1 else "/"
        return rest[slash:]
    return None  # "*", authority-form (CONNECT) or garbage


class Forwarder:
    """A WSGI app that forwards every request to one upstream and streams the answer.

    :param url: the upstream, ``http://`` or ``https://``, optionally with a base
        path that request paths are joined to.
    :param tls_verify: verify the upstream's certificate (default), ``False`` to
        skip it (warns once), or the path of a CA bundle to verify against.
    :param client_cert: path of a client certificate (PEM) for mutual TLS.
    :param client_key: path of its key, if not in the certificate file.
    :param connect_timeout: seconds to connect; exceeded -> ``504``.
    :param read_timeout: seconds between bytes from the upstream; exceeded -> ``504``.
    :param preserve_host: send the client's ``Host`` instead of the upstream's.
    :param strip_impersonation: drop client ``Impersonate-*`` headers (default).
    :param pool_size: upstream connections kept open; match the server's threads.
    :param chunk_size: largest piece read from a streamed body.
    :param websocket: relay WebSocket and other HTTP/1.1 Upgrade requests
        through the server's raw socket (default); ``False`` forwards them as
        plain requests without the upgrade (see :mod:`authproxy.tunnel`).
    :param websocket_idle_timeout: seconds a tunnel may carry no byte either
        way before it is closed; 0 or None: no limit.
    :param websocket_max_lifetime: seconds after which any tunnel is closed;
        0 or None (default): no limit.

    Example::

        app = Forwarder("https://dashboard.internal", tls_verify="/etc/ca.pem")
    """

    def __init__(
        self,
        url: str,
        *,
        tls_verify: bool | str = True,
        client_cert: str | None = None,
        client_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        preserve_host: bool = False,
        strip_impersonation: bool = True,
        pool_size: int = 16,
        chunk_size: int = 64 * 1024,
        websocket: bool = True,
        websocket_idle_timeout: float | None = 3600.0,
        websocket_max_lifetime: float | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ConfigError("upstream.url", f"expected an http:// or https:// URL, got {url!r}")
        if not parts.hostname:
            raise ConfigError("upstream.url", f"no host in {url!r}")
        if parts.username or parts.password:
            raise ConfigError("upstream.url", "credentials in the URL are not supported")
        if parts.fragment:
            raise ConfigError("upstream.url", f"a fragment makes no sense here: {url!r}")
        for key, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
            if not value > 0:
                raise ConfigError(f"upstream.{key}", f"expected a positive number, got {value!r}")
        for key, limit in (
            ("websocket_idle_timeout", websocket_idle_timeout),
            ("websocket_max_lifetime", websocket_max_lifetime),
        ):
            if limit is not None and not limit >= 0:
                raise ConfigError(
                    f"upstream.{key}", f"expected seconds (0: no limit), got {limit!r}"
                )
        if pool_size < 1:
            raise ConfigError("upstream.pool_size", f"expected at least 1, got {pool_size!r}")
        self.url = url
        self.preserve_host = preserve_host
        self.strip_impersonation = strip_impersonation
        self.chunk_size = chunk_size
        self._base_path = parts.path
        self._base_query = parts.query
        self._address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self._host = parts.netloc
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._connect_timeout = connect_timeout
        if tls_verify is False and parts.scheme == "https":
            log.warning("TLS verification of the upstream %s is OFF (tls_verify = false)", url)
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        cert: str | tuple[str, str] | None = client_cert
        if client_cert and client_key:
            cert = (client_cert, client_key)
        self.session = self._make_session(tls_verify, cert, pool_size)
        prepared = requests.Request("GET", f"{parts.scheme}://{parts.netloc}/").prepare()
        adapter = self.session.get_adapter(prepared.url or "")
        assert isinstance(adapter, HTTPAdapter)
        self._pool = adapter.get_connection_with_tls_context(prepared, tls_verify, cert=cert)
        self._tunnel = (
            Tunnel(
                self._pool,
                timeout=self._timeout,
                idle_timeout=websocket_idle_timeout,
                max_lifetime=websocket_max_lifetime,
                chunk_size=chunk_size,
            )
            if websocket
            else None
        )
        self._ready_at = 0.0
        self._ready = False
        self._ready_lock = threading.Lock()

    @staticmethod
    def _make_session(
        verify: bool | str, cert: str | tuple[str, str] | None, pool_size: int
    ) -> requests.Session:
        session = requests.Session()
        # No env proxies, no .netrc, no REQUESTS_CA_BUNDLE: the config decides.
        session.trust_env = False
        session.verify = verify
        session.cert = cert
        session.max_redirects = 0
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    # -- the request ---------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sanitize(environ, strip_impersonation=self.strip_impersonation)
        target = request_target(environ)
        if target is None:
            return _error(start_response, "400 Bad Request")
        target = join_path(self._base_path, target)
        if self._base_query:
            path, sep, query = target.partition("?")
            target = f"{path}?{self._base_query}&{query}" if sep else f"{path}?{self._base_query}"
        try:
            body, chunked = _request_body(environ, self.chunk_size)
        except ValueError:
            return _error(start_response, "400 Bad Request")
        except LookupError:
            return _error(start_response, "411 Length Required")
        method = environ["REQUEST_METHOD"]
        environ[UPSTREAM_URL_KEY] = self.url

        def relay(
            method: str, response: urllib3.BaseHTTPResponse, start_response: StartResponse
        ) -> Iterable[bytes]:
            return self._relay(method, response, start_response, environ)

        # An upgrade only means something on an HTTP/1.1 connection; elsewhere
        # the request is served as if it had not asked (RFC 9110 7.8 allows it).
        if UPGRADE_KEY in environ and self._tunnel and environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
            headers = self._headers(environ)
            tunnel = self._tunnel
            return tunnel(environ, start_response, method, target, headers, body, chunked, relay)
        started = time.perf_counter()
        try:
            response = self._send(method, target, self._headers(environ), body, chunked)
        except UpstreamError as exc:
            log.warning(
                "upstream %s failed: %s %s: %s", self.url, method, target, type(exc).__name__
            )
            return _error(start_response, exc.status)
        environ[UPSTREAM_MS_KEY] = (time.perf_counter() - started) * 1000.0
        return relay(method, response, start_response)

    def _headers(self, environ: WSGIEnvironment) -> dict[str, str]:
        headers = {
            header_name(key): value for key, value in environ.items() if key[:5] == "HTTP_"
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        if environ.get("CONTENT_LENGTH"):
            headers["Content-Length"] = environ["CONTENT_LENGTH"]
        client_host = headers.get("Host")
        if not self.preserve_host or not client_host:
            headers["Host"] = self._host
        remote = environ.get("REMOTE_ADDR")
        if remote:
            prior = headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
        headers.setdefault("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http"))
        if client_host:
            headers.setdefault("X-Forwarded-Host", client_host)
        # Forward exactly what the client sent: the HTTP library adds nothing.
        headers.setdefault("User-Agent", SKIP_HEADER)
        headers.setdefault("Accept-Encoding", SKIP_HEADER)
        if environ.get("authproxy.te_trailers"):
            headers["Te"] = "trailers"
        return headers

    def _send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Any,
        chunked: bool,
    ) -> urllib3.BaseHTTPResponse:
        pool = self._pool
        # One retry, only when a kept-alive connection turned out to be dead
        # before anything was answered and the request can be sent again.
        for attempt in (0, 1):
            conn = pool._get_conn()
            reused = conn.sock is not None
            try:
                return pool._make_request(
                    conn,
                    method,
                    target,
                    body=body,
                    headers=headers,
                    timeout=self._timeout,
                    chunked=chunked,
                    response_conn=conn,
                    preload_content=False,
                    decode_content=False,
                    enforce_content_length=True,
                )
            except BaseException as exc:
                conn.close()
                pool._put_conn(conn)
                if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
                    raise UpstreamTimeout(str(exc)) from exc
                retry = (
                    attempt == 0
                    and reused
                    and body is None
                    and method in _IDEMPOTENT
                    and isinstance(exc, (ConnectionError, http.client.RemoteDisconnected))
                )
                if retry:
                    continue
                if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
                    raise UpstreamConnectError(str(exc)) from exc
                if isinstance(exc, http.client.HTTPException):
                    raise UpstreamProtocolError(str(exc)) from exc
                raise
        raise AssertionError("unreachable")

    def _relay(
        self,
        method: str,
        response: urllib3.BaseHTTPResponse,
        start_response: StartResponse,
        environ: WSGIEnvironment,
    ) -> Iterable[bytes]:
        raw = response.headers
        drop = HOP_BY_HOP_NAMES
        if "connection" in raw:
            drop = drop.union(connection_tokens(raw["connection"]))
        headers = [(k, v) for k, v in raw.iteritems() if k.lower() not in drop]
        status = f"{response.status} {response.reason}"
        length = response.length_remaining
        if method == "HEAD" or response.status in _NO_BODY_STATUS or length == 0:
            response.release_conn()
            start_response(status, headers)
            return []
        content_type = raw.get("content-type", "").lower()
        if length is not None and length <= SMALL_BODY and not content_type.startswith(
            _STREAMING_TYPES
        ):
            try:
                data = response.read()
            except Exception as exc:
                response.close()
                response.release_conn()
                log.warning("upstream %s failed mid-body: %s", self.url, type(exc).__name__)
                return _error(start_response, "502 Bad Gateway")
            response.release_conn()
            start_response(status, headers)
            return [data]
        start_response(status, headers)
        # Watch the client while waiting for the upstream: a quiet stream whose
        # client left is closed now, not when the upstream next writes.
        wait = UpstreamWait.create(response, environ, self._timeout.read_timeout or 60.0)
        return _Stream(response, self.chunk_size, wait)

    # -- readiness -------------------------------------------------------------

    def check_ready(self, cache_seconds: float = 2.0) -> bool:
        """True if the upstream accepts TCP connections (cached for *cache_seconds*)."""
        now = time.monotonic()
        if now - self._ready_at < cache_seconds:
            return self._ready
        with self._ready_lock:
            if now - self._ready_at < cache_seconds:
                return self._ready
            try:
                socket.create_connection(self._address, timeout=self._connect_timeout).close()
                self._ready = True
            except OSError:
                self._ready = False
            self._ready_at = time.monotonic()
        return self._ready

    def close(self) -> None:
        self.session.close()
        self._pool.close()


class _Stream:
    """A streamed upstream body: each piece passed on as it arrives, closed with the client.

    A failure mid-body raises, so the server aborts the client connection
    instead of ending the body short and making a truncated file look whole.
    With *wait*, a client that hangs up while the upstream is quiet ends the
    body at once (:class:`~authproxy.sockets.ClientGone`).
    """

    __slots__ = ("_response", "_chunk_size", "_wait")

    def __init__(
        self,
        response: urllib3.BaseHTTPResponse,
        chunk_size: int,
        wait: UpstreamWait | None = None,
    ) -> None:
        self._response = response
        self._chunk_size = chunk_size
        self._wait = wait

    def __iter__(self) -> Iterator[bytes]:
        read1 = self._response.read1
        size = self._chunk_size
        wait = self._wait.wait if self._wait is not None else None
        try:
            while True:
                if wait is not None:
                    wait()
                data = read1(size)
                if not data:
                    return
                yield data
        except (ClientGone, UpstreamError):
            raise
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise UpstreamProtocolError(f"upstream body failed: {type(exc).__name__}") from exc

    def close(self) -> None:
        if self._wait is not None:
            self._wait.close()
        response = self._response
        if not response.closed:
            response.close()  # not read to the end: the connection can't be reused
        response.release_conn()


def _request_body(environ: WSGIEnvironment, chunk_size: int) -> tuple[Any, bool]:
    """The body to send upstream and whether to send it chunked.

    Raises ValueError for a malformed Content-Length and LookupError when the
    body has no length and the server cannot say where it ends.
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        if not length.isdigit():
            raise ValueError(length)
        remaining = int(length)
        if remaining == 0:
            return b"", False
        return _read_exact(stream, remaining, chunk_size), False
    if environ.get(REQUEST_CHUNKED_KEY):
        if not environ.get("wsgi.input_terminated"):
            raise LookupError("chunked body without wsgi.input_terminated")
        return _read_all(stream, chunk_size), True
    return None, False


def _read_exact(stream: Any, remaining: int, chunk_size: int) -> Iterator[bytes]:
    while remaining > 0:
        data = stream.read(min(remaining, chunk_size))
        if not data:
            raise UpstreamProtocolError("client body ended before its Content-Length")
        remaining -= len(data)
        yield data


def _read_all(stream: Any, chunk_size: int) -> Iterator[bytes]:
    while True:
        data = stream.read(chunk_size)
        if not data:
            return
        yield data


def _error(start_response: StartResponse, status: str) -> list[bytes]:
    body = _GENERIC_BODY[status]
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]
