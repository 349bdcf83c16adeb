"""One log line per request, written when the response is done, secrets redacted."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..addresses import (
    CLIENT_ADDRESS,
    DEFAULT_TRUSTED_PROXIES,
    client_address,
    parse_networks,
)
from ..context import (
    IDENTITY,
    REFUSAL,
    REQUEST_ID,
    TUNNEL_BYTES_IN,
    TUNNEL_BYTES_OUT,
    TUNNEL_END,
    UPSTREAM_MS,
    CountedBody,
)
from ..errors import ConfigError
from ..headers import environ_key
from ..secrets import REDACTED

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

#: Never logged by value, whatever ``log_headers`` says.
SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "cf-access-jwt-assertion",
        "cf-access-token",
        "x-goog-iap-jwt-assertion",
        "x-pomerium-jwt-assertion",
    }
)
_FORMATS = ("json", "combined")
# ensure_ascii: U+2028, U+0085 and every other non-ASCII character as \uXXXX.
_ENCODE = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode

__all__ = ["SENSITIVE_HEADERS", "AccessLog", "client_address", "parse_networks"]


class AccessLog:
    """Log one line per request through :mod:`logging`, after the body is sent.

    :param format: ``"json"`` (one object per line, stable keys) or ``"combined"``
        (Apache/nginx combined plus the duration in ms, then ``refusal="..."``
        when a step refused the request).
    :param logger: name of the :class:`logging.Logger` written to (level INFO).
    :param log_query: keep the query string in the logged path (off: it often
        carries tokens).
    :param trusted_proxies: CIDR networks whose ``client_ip_header`` is believed
        (default: loopback). The resolved address is left in
        ``environ["authproxy.client_address"]`` for the steps inside.
    :param client_ip_header: ``X-Forwarded-For``, or e.g. ``Cf-Connecting-Ip``
        behind cloudflared.
    :param log_headers: request headers to add to each line, for debugging;
        credentials among them are always shown as ``***``.

    Every field is escaped: no line holds a raw CR, LF, NUL, U+2028 or U+0085
    (JSON escapes all but printable ASCII; ``combined`` JSON-quotes the
    request, referer and user agent always, ``client`` and ``identity`` when
    they are not one plain word).

    Fields: time, request_id, client, method, path, protocol, status, bytes,
    duration_ms, upstream_ms, identity, user_agent, refusal; for a WebSocket
    (Upgrade) tunnel, written when it ends, also tunnel_bytes_in (client to
    upstream), tunnel_bytes_out and tunnel_end (closed, idle, lifetime, reset,
    error); ``duration_ms`` is then the tunnel's whole life.

    Example::

        app = AccessLog(app, format="json", trusted_proxies=["127.0.0.1/32"])
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        format: str = "json",  # noqa: A002 - the config key's name
        logger: str = "authproxy.access",
        log_query: bool = False,
        trusted_proxies: list[str] | None = None,
        client_ip_header: str = "X-Forwarded-For",
        log_headers: list[str] | None = None,
    ) -> None:
        if format not in _FORMATS:
            raise ConfigError("format", f"expected one of {_FORMATS}, got {format!r}")
        self.app = app
        self.format = format
        self.logger = logging.getLogger(logger)
        self.log_query = log_query
        self.trusted = parse_networks(
            DEFAULT_TRUSTED_PROXIES if trusted_proxies is None else trusted_proxies,
            "trusted_proxies",
        )
        self.client_ip_key = environ_key(client_ip_header)
        self.log_headers = tuple((h, environ_key(h)) for h in (log_headers or ()))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.time()
        # Read before the inner steps rewrite headers (identity, injection).
        client = client_address(environ, self.trusted, self.client_ip_key)
        # Steps inside (ip-allow, ratelimit) judge the same address the log shows.
        environ[CLIENT_ADDRESS] = client
        record: dict[str, Any] = {
            "client": client,
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "referer": environ.get("HTTP_REFERER"),
        }
        if self.log_headers:
            record["headers"] = {
                name: REDACTED if name.lower() in SENSITIVE_HEADERS else environ.get(key)
                for name, key in self.log_headers
                if key in environ
            }
        state = [0]

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            state[0] = int(status[:3])
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, start)
        except BaseException:
            state[0] = state[0] or 500
            self._emit(environ, record, started, state[0], 0)
            raise

        def done(sent: int, aborted: str | None) -> None:
            if aborted is not None:  # the body broke after the status went out
                record["aborted"] = aborted
            self._emit(environ, record, started, state[0], sent)

        return CountedBody(body, done)

    def _emit(
        self,
        environ: WSGIEnvironment,
        record: dict[str, Any],
        started: float,
        status: int,
        sent: int,
    ) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
        if not self.log_query:
            path = path.partition("?")[0]
        identity = environ.get(IDENTITY)
        upstream_ms = environ.get(UPSTREAM_MS)
        record.update(
            time=_iso_time(started),
            request_id=environ.get(REQUEST_ID),
            method=environ.get("REQUEST_METHOD"),
            path=path,
            protocol=environ.get("SERVER_PROTOCOL"),
            status=status,
            bytes=sent,
            duration_ms=round((time.time() - started) * 1000.0, 3),
            upstream_ms=None if upstream_ms is None else round(upstream_ms, 3),
            identity=identity.name if identity is not None else None,
            refusal=environ.get(REFUSAL),
        )
        if TUNNEL_END in environ:
            record.update(
                tunnel_bytes_in=environ.get(TUNNEL_BYTES_IN),
                tunnel_bytes_out=environ.get(TUNNEL_BYTES_OUT),
                tunnel_end=environ.get(TUNNEL_END),
            )
        line = _ENCODE(record) if self.format == "json" else _combined(record, started)
        # makeRecord + handle: what logger.info does, minus the stack walk to
        # find the caller, which no access line shows.
        logger = self.logger
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, line, (), None))


_second: tuple[int, str] = (-1, "")


def _iso_time(when: float) -> str:
    """``2026-11-26T01:02:03.456Z``; the part up to the second is made once a second."""
    global _second
    whole = int(when)
    second, text = _second
    if second != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int(when % 1 * 1000):03d}Z"


# Printable ASCII but space and '"': a field that is safe unquoted.
_BARE = re.compile(r"[!#-~]+")


def _bare(value: str | None) -> str:
    """*value* as is when it is one plain word, else JSON-quoted (every control
    character, U+2028, U+0085... escaped); None is ``-``."""
    if value is None:
        return "-"
    if value != "-" and _BARE.fullmatch(value):
        return value
    return json.dumps(value)


def _combined(r: dict[str, Any], started: float) -> str:
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(started))
    request = f"{r['method']} {r['path']} {r['protocol']}"
    return (
        f"{_bare(r['client'])} - {_bare(r['identity'])} [{when}] {json.dumps(request)} "
        f"{r['status']} {r['bytes']} {json.dumps(r['referer'] or '-')} "
        f"{json.dumps(r['user_agent'] or '-')} {r['duration_ms']}"
        + (
            f" tunnel {r['tunnel_bytes_in']} {r['tunnel_bytes_out']} {r['tunnel_end']}"
            if "tunnel_end" in r
            else ""
        )
        + (f" refusal={json.dumps(r['refusal'])}" if r["refusal"] else "")
    )
