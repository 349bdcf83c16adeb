"""What the pipeline's steps share, and the helpers a plugin may use.

Middlewares never import each other; they talk through these environ keys.

================================  =====================================================
``authproxy.request_id``          the request id (str), set by :class:`RequestId`
``authproxy.identity``            the verified identity (:class:`VerifiedIdentity`),
                                  set by the identity step; absent before it
``authproxy.client_address``      the client's address as the access log resolved it
``authproxy.refusal``             why the request was refused (str), for the access log
``authproxy.upstream_url``        the upstream the forwarder sends to
``authproxy.upstream_ms``         time to the upstream's response headers (float, ms),
                                  set once the forwarder has the answer
``authproxy.step``                name of the step that failed, when one raised
``authproxy.tunnel_bytes_in``     bytes relayed client -> upstream by an Upgrade tunnel
``authproxy.tunnel_bytes_out``    bytes relayed upstream -> client by an Upgrade tunnel
``authproxy.tunnel_end``          why the tunnel ended: closed, idle, lifetime, reset, error
``authproxy.path``                the path every decision is made on, see
                                  :func:`request_path` (set on first use)
``authproxy.extra_headers``       upstream header lines that ``HTTP_*`` keys cannot carry
                                  (one name, several lines): a list of ``(name, value)``
                                  pairs, see :func:`add_upstream_header`
================================  =====================================================

``authproxy.extra_headers`` is the one way to send a header name more than once
(``Impersonate-Group: sre`` and ``Impersonate-Group: dev`` on separate lines): an
environ key holds one value, and a comma-joined one is a single group to the
Kubernetes API. The forwarder sends the pairs, in list order and each as its own
line, after the headers it builds from ``HTTP_*`` keys, without merging or
re-casing them. A step adds to the list with :func:`add_upstream_header`, which
refuses a name or value that could split the header block (CR, LF, NUL, ``:``
in the name). Absent or empty: nothing extra is sent (the common case costs one
dict lookup).

Helpers: :func:`request_path` (the normalised path of the target the
forwarder sends), :func:`refuse` (answer with a status, the reason goes to the access
log), :func:`register_secret` (redact a value from every log line),
:func:`identity_of`, :class:`ClientAddress` (the client's address behind
trusted proxies) and :func:`refusal_class`. ``docs/plugins.md`` is the guide.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from .addresses import CLIENT_ADDRESS, ClientAddress, in_networks, parse_networks
from .secrets import register_secret

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

REQUEST_ID = "authproxy.request_id"
IDENTITY = "authproxy.identity"
REFUSAL = "authproxy.refusal"
UPSTREAM_URL = "authproxy.upstream_url"
UPSTREAM_MS = "authproxy.upstream_ms"
STEP = "authproxy.step"
TUNNEL_BYTES_IN = "authproxy.tunnel_bytes_in"
TUNNEL_BYTES_OUT = "authproxy.tunnel_bytes_out"
TUNNEL_END = "authproxy.tunnel_end"
EXTRA_HEADERS = "authproxy.extra_headers"
PATH = "authproxy.path"

__all__ = [
    "CLIENT_ADDRESS",
    "EXTRA_HEADERS",
    "IDENTITY",
    "PATH",
    "REFUSAL",
    "REQUEST_ID",
    "STEP",
    "TUNNEL_BYTES_IN",
    "TUNNEL_BYTES_OUT",
    "TUNNEL_END",
    "UPSTREAM_MS",
    "UPSTREAM_URL",
    "ClientAddress",
    "CountedBody",
    "VerifiedIdentity",
    "add_upstream_header",
    "identity_of",
    "in_networks",
    "parse_networks",
    "plain_response",
    "refusal_class",
    "refuse",
    "register_secret",
    "request_path",
]


@dataclass(frozen=True)
class VerifiedIdentity:
    """Who made the request, as proven by a verified token.

    ``email`` is None for a service token, whose name is ``service_token``.
    ``claims`` holds every verified claim of the token. ``groups`` holds the
    person's group names, in the order the source gave them, when the identity
    step was told where to find them (its ``groups`` option); else it is empty.
    """

    subject: str
    email: str | None = None
    service_token: str | None = None
    issuer: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    groups: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """What the access log shows: the email, else the service token's name."""
        return self.email or self.service_token or self.subject


def identity_of(environ: Mapping[str, Any]) -> VerifiedIdentity | None:
    """The verified identity of this request, or None (no identity step ran, or it let
    the request through unauthenticated on a public route)."""
    identity = environ.get(IDENTITY)
    return identity if isinstance(identity, VerifiedIdentity) else None


_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
# Where a segment's name ends for an upstream that takes ";" path parameters
# (Tomcat, Jetty: "..;x" is ".."), raw or encoded.
_PARAMETERS = re.compile(r";|%3[bB]")


def request_path(environ: Mapping[str, Any]) -> str | None:
    """The path of the target the forwarder sends, as the strictest upstream resolves it.

    Every decision on a path (health endpoints, ``skip_paths``, a plugin's
    routes) is made on this, never on ``PATH_INFO`` or ``SCRIPT_NAME``, which a
    server may take from client headers (gunicorn's ``forwarder_headers``). The
    raw target (``RAW_URI``, else ``REQUEST_URI``, else ``SCRIPT_NAME`` +
    ``PATH_INFO``) loses its query, escapes of unreserved characters are
    decoded (``%2e`` is ``.``), and dot segments are removed as RFC 3986 5.2.4
    does, where a segment counts as a dot segment by its name before any ``;``
    or ``%3B`` (``..;x`` and ``..%3b`` are ``..``). Other escapes, ``;``
    parameters of other segments and empty segments are kept.

    None when there is no path to judge: a ``..`` that climbs above the root,
    or a target that is not a path (``*``, authority-form). The result is kept
    in ``environ["authproxy.path"]``.
    """
    cached = environ.get(PATH)
    if cached is not None:
        return cached or None
    path = _normalise(_raw_path(environ))
    if isinstance(environ, dict):
        environ[PATH] = path or ""
    return path


def _raw_path(environ: Mapping[str, Any]) -> str | None:
    raw: str | None = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        return path.replace("%", "%25") or "/"
    raw = raw.partition("?")[0]
    if raw.startswith("/"):
        return raw
    scheme, sep, rest = raw.partition("://")
    if sep and scheme.lower() in ("http", "https"):  # absolute-form: the path part only
        slash = rest.find("/")
        return rest[slash:] if slash != -1 else "/"
    return None


def _normalise(path: str | None) -> str | None:
    if path is None:
        return None
    if path[:1] == "/" and "%" not in path and ";" not in path and "/." not in path:
        return path  # no escape, no parameter, no dot segment: already normal
    path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    out: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        name = _PARAMETERS.split(segment, 1)[0]
        last = index == len(segments) - 1
        if name == ".":
            if last:
                out.append("")
        elif name == "..":
            if not out:
                return None  # above the root
            out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


_HEADER_NAME_BAD = frozenset(" \t\r\n\0:")


def add_upstream_header(environ: WSGIEnvironment, name: str, value: str) -> None:
    """Send ``name: value`` upstream as a line of its own (see ``authproxy.extra_headers``).

    Call it once per line: a name given twice is sent twice, in call order.
    *value* is WSGI text (latin-1 for the bytes to send). Raises ValueError for
    a name that is no header name or a value holding CR, LF or NUL.
    """
    if not name or not _HEADER_NAME_BAD.isdisjoint(name):
        raise ValueError(f"not a header name: {name!r}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"the value of {name} holds CR, LF or NUL")
    extra = environ.get(EXTRA_HEADERS)
    if extra is None:
        environ[EXTRA_HEADERS] = extra = []
    extra.append((name, value))


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def status_phrase(code: int) -> str:
    """The usual reason phrase of *code* (``"Bad Gateway"``), or ``""`` if it has none."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def plain_response(
    start_response: StartResponse,
    code: int,
    body: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    exc_info: Any = None,
) -> list[bytes]:
    """Answer with a short text body (default: the status phrase)."""
    phrase = _REASONS.get(code) or status_phrase(code) or "Error"
    data = ((body if body is not None else phrase) + "\n").encode()
    start_response(
        f"{code} {phrase}",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *(headers or ()),
        ],
        exc_info,
    )
    return [data]


def refuse(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    code: int,
    reason: str,
    *,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """Refuse the request with *code*; *reason* goes to the access log, not the client.

    The client sees only the status phrase, so the reason may be specific but
    must never contain a secret. Write it as ``"class: detail"``, a short fixed
    class first (``"rate limited: identity"``, ``"not allowed: bob@example.com"``):
    the access log keeps all of it, metrics count by :func:`refusal_class`.
    *headers* are added to the response (e.g. ``Retry-After``).
    """
    environ[REFUSAL] = reason
    return plain_response(start_response, code, headers=headers)


_CLASS_CHARS = re.compile(r"[^a-z0-9 _.-]+")


def refusal_class(reason: str, max_length: int = 40) -> str:
    """The fixed part of a refusal *reason*: the text before the first ``:``,
    lower-cased, reduced to ``[a-z0-9 _.-]`` and at most *max_length* characters.

    ``refusal_class("not allowed: bob@example.com") == "not allowed"``.
    """
    head = reason.partition(":")[0].strip().lower()
    return _CLASS_CHARS.sub("", head)[:max_length].strip() or "unspecified"


class CountedBody:
    """A response body that counts the bytes sent and reports once, when closed.

    *on_close* gets the byte count and, when the body broke off after the
    status went out, the name of the exception (else None). The access log and
    the metrics plugin record a request this way: after its body, not before.

    Example::

        return CountedBody(self.app(environ, start), lambda sent, aborted: log(sent))
    """

    __slots__ = ("_body", "_on_close", "_sent", "_aborted", "_done")

    def __init__(self, body: Iterable[bytes], on_close: Callable[[int, str | None], None]) -> None:
        self._body = body
        self._on_close = on_close
        self._sent = 0
        self._aborted: str | None = None
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self._count(self._body, len)

    @property
    def splice_to(self) -> Callable[[Any, int, bytes], Iterator[int]] | None:
        """The body's own ``splice_to`` (a server moving it socket to socket), counted."""
        splice_to = getattr(self._body, "splice_to", None)
        if splice_to is None:
            return None

        def counted(sock: Any, length: int, head: bytes = b"") -> Iterator[int]:
            return self._count(splice_to(sock, length, head), int)

        return counted

    @property
    def feed(self) -> Feed | None:
        """The body's own ``feed`` (a server relaying it from its event loop), counted."""
        feed = getattr(self._body, "feed", None)
        return None if feed is None else _CountedFeed(feed, self)

    @property
    def tunnel(self) -> Any:
        """The body's own ``tunnel`` (an accepted upgrade a server may relay itself)."""
        return getattr(self._body, "tunnel", None)

    def _count(self, pieces: Iterable[Any], size: Callable[[Any], int]) -> Iterator[Any]:
        try:
            for piece in pieces:
                self._sent += size(piece)
                yield piece
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._aborted = type(exc).__name__
            raise

    def close(self) -> None:
        try:
            close_body(self._body)
        finally:
            if not self._done:
                self._done = True
                self._on_close(self._sent, self._aborted)


def close_body(body: Any) -> None:
    """Call *body*'s ``close()``, if it has one, as a WSGI server must (PEP 3333)."""
    close = getattr(body, "close", None)
    if close is not None:
        close()


class Feed(Protocol):
    """A streamed response body that a server can relay from its event loop.

    A WSGI body is iterated by a thread that waits for each piece. A body
    that also has a ``feed`` attribute (not None) offers this instead: the
    server waits for :meth:`fileno` to turn readable, then calls
    :meth:`read_nowait` until it returns ``b""``; None means the body ended.
    Errors are the upstream's (:class:`~authproxy.errors.UpstreamError`) and
    abort the client connection, as in iteration. The server still calls
    the body's ``close()`` when done, so the access log writes its line when
    the stream ends. A step that wraps a body keeps the offer by passing
    ``feed`` on (as :class:`CountedBody` does); one that does not, turns it
    into a plain iterated body, which still works and holds a thread.
    """

    #: Seconds the upstream may stay silent before the body fails.
    read_timeout: float | None

    def fileno(self) -> int: ...

    def read_nowait(self) -> bytes | None: ...


class _CountedFeed:
    """A :class:`Feed` whose bytes and failure a :class:`CountedBody` records."""

    __slots__ = ("_feed", "_body", "read_timeout")

    def __init__(self, feed: Feed, body: CountedBody) -> None:
        self._feed = feed
        self._body = body
        self.read_timeout = feed.read_timeout

    def fileno(self) -> int:
        return self._feed.fileno()

    def read_nowait(self) -> bytes | None:
        try:
            data = self._feed.read_nowait()
        except BaseException as exc:
            self._body._aborted = type(exc).__name__
            raise
        if data:
            self._body._sent += len(data)
        return data

    def abort(self, reason: str) -> None:
        """The server gave up on the body (``"ClientGone"``): the log says so."""
        self._body._aborted = reason
