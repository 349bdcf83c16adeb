"""The requests transport adapter that performs the forwarder's upstream exchanges.

:class:`UpstreamAdapter` is a :class:`requests.adapters.HTTPAdapter`, requests'
documented extension point, mounted on the forwarder's :class:`requests.Session`.
Its :meth:`~UpstreamAdapter.send` takes a :class:`requests.PreparedRequest` and
returns a :class:`requests.Response`, as every adapter does; what differs is
the exchange underneath:

* the connection pool comes from requests
  (:meth:`~requests.adapters.HTTPAdapter.get_connection_with_tls_context`), so
  TLS verification, CA bundle and client certificate are requests' own; it is
  looked up once per origin, TLS settings and timeouts, then kept;
* the request goes out as it is (:mod:`authproxy.upstream.transport`): the
  target in ``request.url`` byte for byte (``%2F``, ``%7E``, ``%zz`` intact),
  the headers in ``request.headers`` and no other (a ``Host`` only if there is
  none), the body as given (chunked when it has no ``Content-Length``);
* the response's ``raw`` is a :class:`~authproxy.upstream.transport.Response`:
  ``raw.headers`` keeps repeated fields (``Set-Cookie``) as separate pairs, the
  body is never decoded and moves socket to socket in the kernel when it can.

``response.headers``, ``cookies`` and ``encoding`` are made only when read (a
proxy reads ``raw``); repeated fields are joined there with ``", "``, as with
requests' own adapter. Errors are requests' exceptions (``ConnectionError``,
``SSLError``, ``ConnectTimeout``, ``ReadTimeout``), each chained to the cause;
:func:`authproxy.upstream.failures.describe` puts that cause into words.

Not done, unlike :class:`~requests.adapters.HTTPAdapter`: retries
(``max_retries``; a kept-alive connection found dead before it answered is
replaced once, for a request without a body), and decoding (``content`` is the
bytes as sent, gzip included). A request for which ``proxies`` names a proxy is
sent by :class:`~requests.adapters.HTTPAdapter` itself.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from collections.abc import Iterable, Mapping
from http.client import HTTPMessage
from typing import TYPE_CHECKING, Any, cast

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import MockRequest, MockResponse, RequestsCookieJar
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ConnectTimeout, InvalidURL, ReadTimeout, SSLError
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers, select_proxy
from urllib3.exceptions import ConnectTimeoutError, LocationValueError, NewConnectionError
from urllib3.exceptions import SSLError as Urllib3SSLError

from ..errors import UpstreamError, UpstreamTimeout
from .failures import causes, describe
from .transport import Response, Transport

if TYPE_CHECKING:
    from requests import PreparedRequest

#: Origins (with their TLS settings and timeouts) whose transport is kept; more
#: are dropped oldest first, idle connections closed.
MAX_TRANSPORTS = 16

_NO_TIME = datetime.timedelta(0)
_NO_LAST: tuple[str, Any, Any, Any, Any] = ("\0", None, None, None, None)
_UNSET: Any = object()

_Key = tuple[str, Any, Any, "float | None", "float | None"]


class UpstreamAdapter(HTTPAdapter):
    """A requests transport adapter that sends requests as they are; see the module docstring.

    :param pool_size: idle connections kept per upstream (requests' ``pool_maxsize``);
        match the server's threads.
    :param chunk_size: largest piece read from the upstream at once.
    :param pool_connections: upstreams (origin and TLS settings) whose pools
        requests keeps (its ``pool_connections``).

    Example::

        session = requests.Session()
        session.mount("https://", UpstreamAdapter(pool_size=16))
        response = session.get("https://dashboard.internal/api/v1/namespaces%2Fx", stream=True)
        cookies = [v for k, v in response.raw.headers if k.lower() == "set-cookie"]
    """

    def __init__(
        self, pool_size: int = 16, *, chunk_size: int = 256 * 1024, pool_connections: int = 1
    ) -> None:
        super().__init__(pool_connections=pool_connections, pool_maxsize=pool_size, max_retries=0)
        self.pool_size = pool_size
        self.chunk_size = chunk_size
        self._transports: dict[_Key, Transport] = {}
        self._lock = threading.Lock()
        self._last: tuple[str, Any, Any, Any, Any] = _NO_LAST

    def send(  # type: ignore[override]
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send *request* and read the response head; the body stays on the wire
        (``raw``) until read, whatever *stream* says."""
        url = request.url or ""
        if proxies and select_proxy(url, dict(proxies)):
            return super().send(request, stream, timeout, verify, cert, dict(proxies))
        # The last transport used, for a caller that sends to one origin with the
        # same settings each time (the forwarder): no URL split, no key built.
        origin, last_timeout, last_verify, last_cert, transport = self._last
        if (
            url.startswith(origin)
            and url[len(origin) : len(origin) + 1] == "/"
            and timeout is last_timeout
            and verify is last_verify
            and cert is last_cert
        ):
            target = url[len(origin) :]
        else:
            origin, target = _split(url)
            transport = self.transport(request, timeout, verify, cert, origin)
            self._last = (origin, timeout, verify, cert, transport)
        headers: Any = request.headers
        lines: Iterable[tuple[str, str]] = headers.items()
        if "Host" not in headers:
            lines = [("Host", origin.partition("://")[2].rpartition("@")[2]), *lines]
        body: Any = request.body
        if isinstance(body, str):
            body = body.encode("utf-8")
        chunked = body is not None and "Content-Length" not in headers
        if chunked and isinstance(body, bytes):
            lines = [*lines, ("Content-Length", str(len(body)))]
            chunked = False
        try:
            raw = transport.send(request.method or "GET", target, lines, body, chunked)
        except UpstreamError as exc:
            raise _requests_error(exc, request) from exc
        return UpstreamResponse(raw, request, self)

    def transport(
        self,
        request: PreparedRequest,
        timeout: Any,
        verify: bool | str,
        cert: str | tuple[str, str] | None,
        origin: str | None = None,
    ) -> Transport:
        """The :class:`~authproxy.upstream.transport.Transport` that sends *request*:
        one per origin, TLS settings and timeouts, its pool from
        :meth:`get_connection_with_tls_context` the first time."""
        if origin is None:
            origin = _split(request.url or "")[0]
        connect, read = _timeouts(timeout)
        key: _Key = (origin, verify, tuple(cert) if isinstance(cert, list) else cert, connect, read)
        transport = self._transports.get(key)
        if transport is not None:
            return transport
        with self._lock:
            transport = self._transports.get(key)
            if transport is None:
                try:
                    pool = self.get_connection_with_tls_context(request, verify, cert=cert)
                except LocationValueError as exc:
                    raise InvalidURL(exc, request=request) from exc
                transport = Transport(pool, connect, read, self.chunk_size, self.pool_size)
                while len(self._transports) >= MAX_TRANSPORTS:
                    oldest = next(iter(self._transports))
                    self._transports.pop(oldest).pool.close()
                    self._last = _NO_LAST
                self._transports[key] = transport
        return transport

    def close(self) -> None:
        """Close every kept connection and requests' pools."""
        with self._lock:
            transports = list(self._transports.values())
            self._transports.clear()
            self._last = _NO_LAST
        for transport in transports:
            transport.pool.close()
        super().close()


class UpstreamResponse(requests.Response):
    """A :class:`requests.Response` whose ``raw`` is a transport
    :class:`~authproxy.upstream.transport.Response`.

    ``headers``, ``cookies`` and ``encoding`` are made from ``raw.headers`` when
    first read: a proxy relays ``raw.headers`` and never needs them.
    """

    def __init__(self, raw: Response, request: PreparedRequest, adapter: HTTPAdapter) -> None:
        # Not requests.Response.__init__: it makes a header dict and a cookie jar
        # per response. The attributes it sets are all set here
        # (tests/test_adapter.py compares them).
        self._content: Any = False
        self._content_consumed = False
        self._next = None
        self.status_code = raw.status
        self.raw = raw
        self.url = request.url or ""
        self.history = []
        self.reason = raw.reason
        self.elapsed = _NO_TIME
        self.request = request
        self.connection = adapter
        self._headers: CaseInsensitiveDict[str] | None = None
        self._cookies: RequestsCookieJar | None = None
        self._encoding: str | None = _UNSET

    @property
    def headers(self) -> CaseInsensitiveDict[str]:
        if self._headers is None:
            joined: dict[str, str] = {}
            names: dict[str, str] = {}
            raw = cast(Response, self.raw)
            for name, value in raw.headers:
                lower = name.lower()
                if lower in joined:
                    joined[lower] += ", " + value
                else:
                    joined[lower] = value
                    names[lower] = name
            self._headers = CaseInsensitiveDict({names[k]: v for k, v in joined.items()})
        return self._headers

    @headers.setter
    def headers(self, value: CaseInsensitiveDict[str]) -> None:
        self._headers = value

    @property
    def cookies(self) -> RequestsCookieJar:
        if self._cookies is None:
            jar = RequestsCookieJar()
            message = HTTPMessage()
            raw = cast(Response, self.raw)
            for name, value in raw.headers:
                message[name] = value  # appends: repeated Set-Cookie stay separate
            jar.extract_cookies(MockResponse(message), MockRequest(self.request))  # type: ignore[arg-type]
            self._cookies = jar
        return self._cookies

    @cookies.setter
    def cookies(self, value: RequestsCookieJar) -> None:
        self._cookies = value

    @property
    def encoding(self) -> str | None:
        if self._encoding is _UNSET:
            self._encoding = get_encoding_from_headers(self.headers)
        return self._encoding

    @encoding.setter
    def encoding(self, value: str | None) -> None:
        self._encoding = value


def _split(url: str) -> tuple[str, str]:
    """``scheme://authority`` and the request target, the target untouched."""
    start = url.find("//") + 2
    slash = url.find("/", start)
    query = url.find("?", start)
    if query != -1 and (slash == -1 or query < slash):
        return url[:query], "/" + url[query:]
    if slash == -1:
        return url, "/"
    return url[:slash], url[slash:]


def _timeouts(timeout: Any) -> tuple[float | None, float | None]:
    """(connect, read) from what requests accepts: a number, a pair, a urllib3 Timeout, None."""
    if isinstance(timeout, tuple):
        connect, read = timeout
        return connect, read
    if timeout is None or isinstance(timeout, (int, float)):
        return timeout, timeout
    connect, read = timeout.connect_timeout, timeout.read_timeout  # urllib3.Timeout
    return (
        connect if isinstance(connect, (int, float)) else None,
        read if isinstance(read, (int, float)) else None,
    )


def _requests_error(exc: UpstreamError, request: PreparedRequest) -> requests.RequestException:
    """requests' exception for a failed exchange, saying why (see failures.describe)."""
    reason = describe(exc)
    found = list(causes(exc))
    if isinstance(exc, UpstreamTimeout):
        connecting = any(
            isinstance(c, ConnectTimeoutError) and not isinstance(c, NewConnectionError)
            for c in found
        )
        if connecting:
            return ConnectTimeout(reason, request=request)
        return ReadTimeout(reason, request=request)
    if any(isinstance(c, (ssl.SSLError, Urllib3SSLError)) for c in found):
        return SSLError(reason, request=request)
    return RequestsConnectionError(reason, request=request)
