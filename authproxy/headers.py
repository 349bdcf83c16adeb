"""Header rules shared by the pipeline and the forwarder.

Everything here works on the WSGI environ (``HTTP_*`` keys), because that is
the only channel the middlewares share. :func:`sanitize` runs once per request,
before any middleware adds a header, so that a client cannot use
``Connection: Authorization`` to delete what the proxy injects.
"""

from __future__ import annotations

import functools
from typing import Any

# RFC 9110 7.6.1 plus the old names that proxies still see. Keys as in environ.
HOP_BY_HOP_NAMES = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

SANITIZED_KEY = "authproxy.sanitized"
UPGRADE_KEY = "authproxy.upgrade"
TE_TRAILERS_KEY = "authproxy.te_trailers"
REQUEST_CHUNKED_KEY = "authproxy.request_chunked"
REQUEST_CODINGS_KEY = "authproxy.request_codings"


def environ_key(name: str) -> str:
    """``X-Forwarded-For`` -> ``HTTP_X_FORWARDED_FOR``."""
    upper = name.upper().replace("-", "_")
    if upper in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        return upper
    return "HTTP_" + upper


def header_name(key: str) -> str:
    """``HTTP_X_FORWARDED_FOR`` -> ``X-Forwarded-For``."""
    name = _names.get(key)
    if name is None:
        name = (key[5:] if key.startswith("HTTP_") else key).replace("_", "-").title()
        # The same few dozen names come with every request; a client's made-up
        # ones must not grow the table without end.
        if len(_names) < 1024 and len(key) <= 64:
            _names[key] = name
    return name


_names: dict[str, str] = {}


HOP_BY_HOP_KEYS = frozenset(environ_key(n) for n in HOP_BY_HOP_NAMES)


def has_ctl(value: str) -> bool:
    """True if *value* holds CR, LF or NUL (never allowed in a header value)."""
    return "\r" in value or "\n" in value or "\0" in value


def connection_tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


@functools.lru_cache(maxsize=64)
def _dropped(also: frozenset[str]) -> frozenset[str]:
    return HOP_BY_HOP_NAMES | also


def end_to_end(
    headers: list[tuple[str, str]], also: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """*headers* without their hop-by-hop fields: the fixed list, the names in
    *also* (lower case) and every name a ``Connection`` field lists."""
    drop = _dropped(also)
    kept = []
    listed: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in drop:
            kept.append((name, value))
        elif lower == "connection":
            listed += connection_tokens(value)
    more = drop.union(listed)
    if len(more) == len(drop):  # "Connection: keep-alive", "close": nothing else to drop
        return kept
    return [(name, value) for name, value in kept if name.lower() not in more]


def sanitize(environ: dict[str, Any], *, strip_impersonation: bool = True) -> None:
    """Remove hop-by-hop and impersonation headers from *environ*, once.

    Runs before any middleware injects a header; later calls are a no-op, so
    every component that adds headers can call it to be safe when used alone.
    A request to upgrade (WebSocket) is remembered under ``authproxy.upgrade``
    and ``Te: trailers`` under ``authproxy.te_trailers``, as Go's reverse proxy
    does, before the headers go; a body sent with ``Transfer-Encoding`` is
    marked under ``authproxy.request_chunked``, and codings other than a
    lone ``chunked`` are kept under ``authproxy.request_codings``.
    """
    if SANITIZED_KEY in environ:
        return
    environ[SANITIZED_KEY] = True
    # Like Go, look at Te before anything is removed: "Connection: te" must not
    # hide the client's wish for trailers.
    te = environ.get("HTTP_TE")
    if te is not None and "trailers" in connection_tokens(te):
        environ[TE_TRAILERS_KEY] = True
    # And before Connection can remove it: "Connection: transfer-encoding"
    # must not turn a chunked body into no body at all.
    codings = environ.get("HTTP_TRANSFER_ENCODING")
    if codings is not None:
        environ[REQUEST_CHUNKED_KEY] = True
        if connection_tokens(codings) != ["chunked"]:
            # gunicorn takes "gzip, chunked" and passes the body on still gzipped.
            environ[REQUEST_CODINGS_KEY] = codings
    connection = environ.get("HTTP_CONNECTION")
    if connection is not None:
        tokens = connection_tokens(connection)
        if "upgrade" in tokens and "HTTP_UPGRADE" in environ:
            environ[UPGRADE_KEY] = environ["HTTP_UPGRADE"]
        for token in tokens:
            key = environ_key(token)
            # CONTENT_LENGTH/TYPE are framing, handled by the server; never
            # let Connection delete them.
            if key.startswith("HTTP_"):
                environ.pop(key, None)
    for key in HOP_BY_HOP_KEYS:
        if key in environ:
            del environ[key]
    if strip_impersonation:
        for key in [k for k in environ if k.startswith("HTTP_IMPERSONATE_")]:
            del environ[key]
