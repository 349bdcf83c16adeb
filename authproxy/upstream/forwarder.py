"""The forwarder: the only code that talks to the upstream.

Each request becomes a :class:`requests.PreparedRequest`, built here as the
client sent it (raw target, no header added: ``Session.prepare_request`` would
re-encode the target and add headers of its own), signed by ``session.auth``
if one is set, and sent through the transport adapter the forwarder's
:class:`requests.Session` mounts for the upstream's URL. authproxy's own
adapter (:class:`~authproxy.upstream.adapter.UpstreamAdapter`) hands back the
upstream's raw response, relayed as it came; any other adapter's response is
relayed from its urllib3 ``raw``, undecoded.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.auth import HTTPBasicAuth
from requests.models import PreparedRequest
from urllib3 import HTTPHeaderDict
from urllib3.exceptions import InsecureRequestWarning
from urllib3.util import SKIP_HEADER

from ..config import UpstreamConfig
from ..context import EXTRA_HEADERS, UPSTREAM_MS, UPSTREAM_URL, plain_response, status_phrase
from ..errors import ConfigError, UpstreamError, UpstreamTimeout
from ..headers import (
    REQUEST_CHUNKED_KEY,
    REQUEST_CODINGS_KEY,
    UPGRADE_KEY,
    end_to_end,
    has_ctl,
    header_name,
    sanitize,
)
from .adapter import UpstreamAdapter
from .client import UpstreamWait
from .failures import describe
from .generic import GenericBody, header_fields
from .transport import Response
from .tunnel import Tunnel

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("authproxy.forwarder")

#: The defaults of every option that [upstream] also takes: that section's own.
_DEFAULTS = UpstreamConfig()
#: Kept under these names for code that imported them from here.
UPSTREAM_MS_KEY = UPSTREAM_MS
UPSTREAM_URL_KEY = UPSTREAM_URL

#: Bodies up to this size with a known length are read whole before the
#: response starts (one write, and an upstream failure is still a clean 502).
SMALL_BODY = 64 * 1024
#: Always streamed, whatever their length (compared in lower case, parameters ignored).
_STREAMING_TYPES = ("text/event-stream",)
#: Methods never forwarded: an upstream that implements them echoes the request,
#: injected credential included, back to the client.
_ECHO_METHODS = frozenset({"TRACE", "TRACK"})
# Beyond the hop-by-hop headers: the two that every WSGI server writes itself
# (a second Date or Server would repeat a singleton field).
_NOT_RELAYED = frozenset({"date", "server"})
#: Upstreams already warned about (tls_verify = false). ``authproxy serve`` builds
#: the app once before forking, so its workers inherit this and stay quiet.
_WARNED_INSECURE: set[str] = set()


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
    raw: str | None = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        # PEP 3333: the decoded path is bytes as latin-1, and a "%" in it was "%25".
        encoding = "latin-1" if all(ord(c) < 256 for c in path) else "utf-8"
        path = quote(path, safe="/!$&'()*+,;=:@", encoding=encoding)
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
    :param chunk_size: largest piece read from the upstream at once (bounds memory
        per stream; larger pieces mean fewer writes).
    :param websocket: relay WebSocket and other HTTP/1.1 Upgrade requests
        through the server's raw socket (default); ``False`` forwards them as
        plain requests without the upgrade (see :mod:`authproxy.tunnel`).
    :param websocket_idle_timeout: seconds a tunnel may carry no byte either
        way before it is closed; 0 or None: no limit.
    :param websocket_max_lifetime: seconds after which any tunnel is closed
        (default 12 hours); 0 or None: no limit. A tunnel opened with a verified
        token also closes when that token expires (see :mod:`authproxy.upstream.tunnel`).
    :param upgrades: the ``Upgrade`` protocols relayed as tunnels (default
        ``("websocket",)``; add ``"SPDY/3.1"`` for ``kubectl exec``-style
        clients). Any other is removed and the request forwarded as plain HTTP.
    :param session: a :class:`requests.Session` of your own to send through
        (default: one made here). Honoured: the adapters it mounts (the one
        for the upstream's URL sends each request) and its ``auth`` (applied
        to every request, after the pipeline's steps, e.g. a request signer).
        Not used, whatever they say: ``headers`` (the client's headers are
        what is forwarded), ``cookies`` (nothing is shared between clients),
        ``verify``/``cert`` (``tls_verify``/``client_cert`` decide),
        ``hooks``, ``max_redirects`` (redirects are relayed, not followed)
        and ``trust_env``: no proxy from the environment, no ``.netrc``, no
        ``REQUESTS_CA_BUNDLE``, ever. If only requests' default adapters are
        mounted for the upstream, the forwarder mounts its own
        :class:`~authproxy.upstream.adapter.UpstreamAdapter` on the session
        for the upstream's origin; with an adapter of yours, requests are sent
        (target as urllib3 re-encodes it) and relayed from ``response.raw``,
        and upgrades are forwarded without the upgrade. :meth:`close` leaves
        your session open.

    ``TRACE`` (and IIS's ``TRACK``) are answered ``501``, never forwarded: an
    upstream that implements them would echo the injected credential.

    Example::

        app = Forwarder("https://dashboard.internal", tls_verify="/etc/ca.pem")

    With a session whose ``auth`` signs each request (any
    :class:`requests.auth.AuthBase`; it may add or change headers, and sees a
    body of up to 64 KiB as bytes)::

        class Signer(requests.auth.AuthBase):
            def __call__(self, request):
                request.headers["X-Signature"] = sign(request.method, request.url)
                return request

        session = requests.Session()
        session.auth = Signer()
        app = Forwarder("https://dashboard.internal", session=session)
    """

    def __init__(
        self,
        url: str,
        *,
        tls_verify: bool | str = _DEFAULTS.tls_verify,
        client_cert: str | None = _DEFAULTS.client_cert,
        client_key: str | None = _DEFAULTS.client_key,
        connect_timeout: float = _DEFAULTS.connect_timeout,
        read_timeout: float = _DEFAULTS.read_timeout,
        preserve_host: bool = _DEFAULTS.preserve_host,
        strip_impersonation: bool = _DEFAULTS.strip_impersonation,
        pool_size: int = 16,
        chunk_size: int = 256 * 1024,
        websocket: bool = _DEFAULTS.websocket,
        websocket_idle_timeout: float | None = _DEFAULTS.websocket_idle_timeout,
        websocket_max_lifetime: float | None = _DEFAULTS.websocket_max_lifetime,
        upgrades: Iterable[str] = _DEFAULTS.upgrades,
        session: requests.Session | None = None,
    ) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError("upstream.url", f"not a valid URL: {url!r} ({exc})") from None
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
        names = [upgrades] if isinstance(upgrades, str) else list(upgrades)
        if not all(isinstance(n, str) and n.strip() and "," not in n for n in names):
            raise ConfigError(
                "upstream.upgrades", f"expected a list of protocol names, got {upgrades!r}"
            )
        #: Upgrade protocols relayed as tunnels (lower case); others go on as plain HTTP.
        self.upgrades = frozenset(n.strip().lower() for n in names)
        self.url = url
        #: The URL as logs show it: its query may hold a secret.
        self._logged_url = url.partition("?")[0]
        self.preserve_host = preserve_host
        self.strip_impersonation = strip_impersonation
        self.chunk_size = chunk_size
        self._base_path = parts.path
        self._base_query = parts.query
        self._address = (parts.hostname, port or (443 if parts.scheme == "https" else 80))
        self._host = parts.netloc
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._timeout = (connect_timeout, read_timeout)
        if tls_verify is False and parts.scheme == "https":
            if url not in _WARNED_INSECURE:
                _WARNED_INSECURE.add(url)
                log.warning("TLS verification of the upstream %s is OFF (tls_verify = false)", url)
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        cert: str | tuple[str, str] | None = client_cert
        if client_cert and client_key:
            cert = (client_cert, client_key)
        self._verify = tls_verify
        self._cert = cert
        self._own_session = session is None
        self.session = session if session is not None else requests.Session()
        try:
            prepared = requests.Request("GET", self._origin + "/").prepare()
        except ValueError as exc:  # requests' InvalidURL: a host it cannot parse
            self.close()
            raise ConfigError("upstream.url", f"not a valid URL: {url!r} ({exc})") from None
        self._mounted: UpstreamAdapter | None = None
        if _default_adapter(self.session, self._origin + "/"):
            self._mounted = UpstreamAdapter(pool_size, chunk_size=chunk_size)
            self.session.mount(self._origin + "/", self._mounted)
        adapter = self.session.get_adapter(self._origin + "/")
        self._transport = None
        if isinstance(adapter, UpstreamAdapter):
            self._transport = adapter.transport(
                prepared, self._timeout, tls_verify, cert, self._origin
            )
        elif websocket:
            log.info("upgrades to %s are forwarded without the upgrade (%s mounted)", url, adapter)
        self._tunnel = (
            Tunnel(
                self._transport,
                idle_timeout=websocket_idle_timeout,
                max_lifetime=websocket_max_lifetime,
                chunk_size=chunk_size,
            )
            if websocket and self._transport is not None
            else None
        )
        self._ready_at = 0.0
        self._ready = False
        self._ready_lock = threading.Lock()

    # -- the request ---------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sanitize(environ, strip_impersonation=self.strip_impersonation)
        if environ["REQUEST_METHOD"] in _ECHO_METHODS:
            return plain_response(start_response, 501)
        target = request_target(environ)
        if target is None:
            return plain_response(start_response, 400)
        target = join_path(self._base_path, target)
        if self._base_query:
            path, sep, query = target.partition("?")
            target = f"{path}?{self._base_query}&{query}" if sep else f"{path}?{self._base_query}"
        try:
            body, chunked = _request_body(environ, self.chunk_size)
        except ValueError:
            return plain_response(start_response, 400)
        except LookupError:
            return plain_response(start_response, 411)
        except NotImplementedError:
            return plain_response(start_response, 501)
        method = environ["REQUEST_METHOD"]
        environ[UPSTREAM_URL_KEY] = self.url
        extra = environ.get(EXTRA_HEADERS)
        if extra and not _extra_ok(extra):
            log.error("a step left a malformed %s entry; request refused", EXTRA_HEADERS)
            return plain_response(start_response, 500)
        auth = self.session.auth
        try:
            if auth is not None and body is not None and not isinstance(body, bytes):
                # A signer hashing the body needs it whole: a small one is read first.
                length = environ.get("CONTENT_LENGTH")
                if length and int(length) <= SMALL_BODY:
                    body = b"".join(body)
            # Only the protocols in `upgrades` are relayed; any other Upgrade was
            # removed with the hop-by-hop headers, so the request goes on as plain
            # HTTP, and a 101 to it is refused (the transport asked for none).
            offered = self._offered(environ)
            if offered and self._tunnel is not None:
                headers, extra = self._headers(environ), extra or []
                if auth is not None:
                    upgrade = {**headers, "Connection": "Upgrade", "Upgrade": offered}
                    signed = self._signed(method, target, upgrade, extra, body)
                    headers, extra = _split_fields(signed)
                return self._tunnel(
                    environ,
                    start_response,
                    method,
                    target,
                    headers,
                    body,
                    chunked,
                    self._relay,
                    extra=extra,
                    upgrade=offered,
                )
            started = time.perf_counter()
            response = self._send(method, target, self._headers(environ), body, extra)
        except _ClientBodyError as exc:
            # The client's fault (malformed chunks, a body shorter than its
            # length, a body that stalled): the upstream got no complete request
            # and did nothing wrong.
            # TimeoutError, or EAGAIN from a socket with its timeout in the kernel.
            if isinstance(exc.__cause__, (TimeoutError, BlockingIOError)):
                return plain_response(start_response, 408)
            return plain_response(start_response, 400)
        except (requests.RequestException, UpstreamError) as exc:
            # The path only: queries often carry tokens.
            path = target.partition("?")[0]
            log.warning(
                "upstream %s failed: %s %s: %s", self._logged_url, method, path, describe(exc)
            )
            timed_out = isinstance(exc, (requests.Timeout, UpstreamTimeout))
            return plain_response(start_response, 504 if timed_out else 502)
        environ[UPSTREAM_MS_KEY] = (time.perf_counter() - started) * 1000.0
        raw = response.raw
        if isinstance(raw, Response):
            return self._relay(raw, start_response, environ)
        return self._relay_generic(method, response, start_response, environ)

    def _offered(self, environ: WSGIEnvironment) -> str | None:
        """The Upgrade to relay as a tunnel: the requested protocols in ``upgrades``.

        An upgrade only means something on an HTTP/1.1 connection; elsewhere
        the request is served as if it had not asked (RFC 9110 7.8 allows it).
        """
        upgrade = environ.get(UPGRADE_KEY)
        if upgrade is None or self._tunnel is None or environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
            return None
        offered = [p.strip() for p in upgrade.split(",") if p.strip().lower() in self.upgrades]
        return ", ".join(offered) or None

    def _headers(self, environ: WSGIEnvironment) -> dict[str, str]:
        headers = {header_name(key): value for key, value in environ.items() if key[:5] == "HTTP_"}
        # Framing is the server's: an HTTP_CONTENT_LENGTH key (a "Content_Length"
        # header under gunicorn's header_map = "dangerous") is a client's claim
        # about a body the server did not frame. header_name() title-cases, so
        # every spelling of the key lands on these two names.
        headers.pop("Content-Length", None)
        headers.pop("Content-Type", None)
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
        # Set, not defaulted: a client's own X-Forwarded-Proto/Host would be a
        # claim the upstream believes. The server already honours a trusted
        # front proxy's scheme (forwarded_allow_ips) in wsgi.url_scheme.
        headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")
        if client_host:
            headers["X-Forwarded-Host"] = client_host
        else:
            headers.pop("X-Forwarded-Host", None)
        # RFC 7239's form of the same claims (host=, proto=, for=): the
        # client's copy would contradict the X-Forwarded-* set above.
        headers.pop("Forwarded", None)
        if environ.get("authproxy.te_trailers"):
            headers["Te"] = "trailers"
        return headers

    def _send(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Any,
        extra: list[tuple[str, str]] | None = None,
    ) -> requests.Response:
        """Send through the adapter mounted for the upstream's URL (a body without
        ``Content-Length`` goes chunked)."""
        url = self._origin + target
        adapter = self.session.get_adapter(url)
        if isinstance(adapter, UpstreamAdapter) and not extra and self.session.auth is None:
            # The hot path: a plain dict of the client's headers, each named once.
            prepared = PreparedRequest()
            prepared.method = method
            prepared.url = url
            prepared.headers = headers  # type: ignore[assignment]
            prepared.body = body
        else:
            prepared = self._signed(method, target, headers, extra, body, adapter)
        return adapter.send(
            prepared,
            stream=True,
            timeout=self._timeout,
            verify=self._verify,
            cert=self._cert,
            proxies={},
        )

    def _signed(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        extra: list[tuple[str, str]] | None,
        body: Any,
        adapter: BaseAdapter | None = None,
    ) -> PreparedRequest:
        """The request with every field in a case-insensitive multi-dict (repeated
        ones apart), passed through ``session.auth`` if set."""
        fields = HTTPHeaderDict(headers)
        for name, value in extra or ():
            fields.add(name, value)
        if isinstance(adapter, HTTPAdapter) and not isinstance(adapter, UpstreamAdapter):
            # urllib3 adds these unless told not to: the client's own, or none.
            for name in ("User-Agent", "Accept-Encoding"):
                if name not in fields:
                    fields[name] = SKIP_HEADER
        prepared = PreparedRequest()
        prepared.method = method
        prepared.url = self._origin + target
        prepared.headers = fields  # type: ignore[assignment]
        prepared.body = body
        auth = self.session.auth
        if auth is None:
            return prepared
        if isinstance(auth, tuple) and len(auth) == 2:
            auth = HTTPBasicAuth(*auth)
        if not callable(auth):
            raise TypeError(f"session.auth: expected an AuthBase or (user, password), got {auth!r}")
        signed: PreparedRequest = auth(prepared)
        return signed

    def _relay(
        self,
        response: Response,
        start_response: StartResponse,
        environ: WSGIEnvironment,
    ) -> Iterable[bytes]:
        headers = end_to_end(response.headers, _NOT_RELAYED)
        status = f"{response.status} {response.reason}"
        if response.complete:
            # The whole body came with the headers (or there is none).
            data = response.take()
            response.release()
            start_response(status, headers)
            return [data] if data else []
        length = response.length
        if length is not None and length <= SMALL_BODY and not _is_streaming(headers):
            try:
                data = response.read_all()
            except UpstreamError as exc:
                log.warning("upstream %s failed mid-body: %s", self._logged_url, describe(exc))
                return plain_response(start_response, int(exc.status[:3]))
            start_response(status, headers)
            return [data]
        start_response(status, headers)
        # Watch the client while waiting for the upstream: a quiet stream whose
        # client left is closed now, not when the upstream next writes.
        wait = UpstreamWait.create(response, environ, self._read_timeout)
        if wait is not None:
            response.before_read = wait.wait
        return _Stream(response, wait)

    def _relay_generic(
        self,
        method: str,
        response: requests.Response,
        start_response: StartResponse,
        environ: WSGIEnvironment,
    ) -> Iterable[bytes]:
        """:meth:`_relay` for a response from another adapter (see :mod:`.generic`)."""
        fields = header_fields(response)
        also = _NOT_RELAYED
        if any(name.lower() == "transfer-encoding" for name, _ in fields):
            also = also | {"content-length"}  # the coding frames the body
        headers = end_to_end(fields, also)
        length: int | None = None
        for name, value in headers:
            if name.lower() == "content-length" and value.strip().isdigit():
                length = int(value)
        code = response.status_code
        if not isinstance(code, int) or not 100 <= code < 600:
            response.close()
            log.warning("upstream %s failed: %s: status %r", self._logged_url, method, code)
            return plain_response(start_response, 502)
        reason = response.reason or ""
        status = f"{code} {reason if reason and not has_ctl(reason) else status_phrase(code)}"
        body = GenericBody(response, self.chunk_size)
        if method == "HEAD" or code in (204, 304) or code < 200:
            body.close()
            start_response(status, headers)
            return []
        if length is not None and length <= SMALL_BODY and not _is_streaming(headers):
            try:
                data = b"".join(body)
            except UpstreamError as exc:
                log.warning("upstream %s failed mid-body: %s", self._logged_url, describe(exc))
                return plain_response(start_response, int(exc.status[:3]))
            finally:
                body.close()
            start_response(status, headers)
            return [data]
        start_response(status, headers)
        return body

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
                with socket.create_connection(self._address, self._connect_timeout) as sock:
                    # With nothing listening on a local port in the ephemeral
                    # range, Linux can connect a socket to itself: not an upstream.
                    self._ready = sock.getsockname() != sock.getpeername()
            except OSError:
                self._ready = False
            self._ready_at = time.monotonic()
        return self._ready

    def close(self) -> None:
        """Close the upstream connections: the session, if the forwarder made it,
        else the adapter it mounted on yours."""
        if self._own_session:
            self.session.close()
        elif getattr(self, "_mounted", None) is not None:
            assert self._mounted is not None
            self._mounted.close()


class _Stream:
    """A streamed upstream body: each piece passed on as it arrives, closed with the client.

    A failure mid-body raises, so the server aborts the client connection
    instead of ending the body short and making a truncated file look whole.
    With *wait*, a client that hangs up while the upstream is quiet ends the
    body at once (:class:`~authproxy.upstream.client.ClientGone`).
    """

    __slots__ = ("_response", "_wait")

    def __init__(self, response: Response, wait: UpstreamWait | None = None) -> None:
        self._response = response
        self._wait = wait

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._response)

    @property
    def splice_to(self) -> Callable[[socket.socket, int, bytes], Iterator[int]] | None:
        """What moves the body to the client's socket inside the kernel, when it can
        (see :meth:`~authproxy.upstream.transport.Response.splice_to`); None otherwise."""
        return self._response.splice_to if self._response.can_splice() else None

    @property
    def feed(self) -> Response:
        """The body for a server to relay from its event loop instead of a thread
        (:class:`~authproxy.context.Feed`; :meth:`Response.read_nowait`)."""
        return self._response

    def close(self) -> None:
        if self._wait is not None:
            self._wait.close()
        self._response.close()


def _default_adapter(session: requests.Session, url: str) -> bool:
    """True if what *session* mounts for *url* is requests' own default, untouched:
    a plain HTTPAdapter under the bare ``http://`` or ``https://`` prefix."""
    for prefix, adapter in session.adapters.items():
        if url.lower().startswith(prefix.lower()):
            return prefix in ("http://", "https://") and type(adapter) is HTTPAdapter
    return False


def _split_fields(prepared: PreparedRequest) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A prepared request's fields as the tunnel takes them: each name's first value,
    and the repeated ones after."""
    first: dict[str, str] = {}
    seen: set[str] = set()
    more: list[tuple[str, str]] = []
    items: Any = prepared.headers.items()
    for name, value in items:
        if name.lower() in seen:
            more.append((name, value))
        else:
            seen.add(name.lower())
            first[name] = value
    return first, more


def _extra_ok(extra: Any) -> bool:
    """True if *extra* is a list of (name, value) text pairs that cannot split the head."""
    if not isinstance(extra, list):
        return False
    for pair in extra:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            return False
        name, value = pair
        if not (isinstance(name, str) and isinstance(value, str)) or not name:
            return False
        if has_ctl(name) or has_ctl(value) or ":" in name or " " in name:
            return False
    return True


def _is_streaming(headers: list[tuple[str, str]]) -> bool:
    for name, value in headers:
        if name.lower() == "content-type":
            return value.lstrip().lower().startswith(_STREAMING_TYPES)
    return False


def _request_body(environ: WSGIEnvironment, chunk_size: int) -> tuple[Any, bool]:
    """The body to send upstream and whether to send it chunked.

    Raises ValueError for a malformed Content-Length, LookupError when the
    body has no length and the server cannot say where it ends, and
    NotImplementedError for a transfer coding other than chunked (as Go does).
    """
    if environ.get(REQUEST_CODINGS_KEY):
        raise NotImplementedError(environ[REQUEST_CODINGS_KEY])
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


class _ClientBodyError(Exception):
    """The client's request body could not be read to its end."""


def _read_exact(stream: Any, remaining: int, chunk_size: int) -> Iterator[bytes]:
    while remaining > 0:
        data = _read(stream, min(remaining, chunk_size))
        if not data:
            raise _ClientBodyError("client body ended before its Content-Length")
        remaining -= len(data)
        yield data


def _read_all(stream: Any, chunk_size: int) -> Iterator[bytes]:
    while True:
        data = _read(stream, chunk_size)
        if not data:
            return
        yield data


def _read(stream: Any, size: int) -> bytes:
    try:
        data: bytes = stream.read(size)
    except Exception as exc:  # the server's parser: a malformed chunk, a lost client
        raise _ClientBodyError(type(exc).__name__) from exc
    return data
