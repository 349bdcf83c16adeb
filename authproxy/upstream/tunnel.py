"""WebSocket (and any HTTP/1.1 Upgrade) relayed through the WSGI server's raw socket.

WSGI cannot express a protocol switch, so this is where authproxy steps
outside it, and only after the whole pipeline has let the request through
(identity verified, headers injected: the upgrade request carries the
injected credential like any other request). The :class:`Tunnel`:

1. refuses with ``501`` if the server offers no raw socket (and says why in
   the log) before anything reaches the upstream;
2. sends the request with ``Connection: Upgrade`` and its ``Upgrade`` on a
   fresh upstream connection made by the forwarder's pool but never returned
   to it (same TLS verification, CA bundle, client certificate, timeouts);
3. relays any answer but ``101`` as an ordinary response: the client's
   connection stays plain HTTP, and its next request goes through the whole
   pipeline again;
4. on ``101`` naming one of the requested protocols, writes the ``101`` to the
   client itself and splices bytes both ways (:func:`~authproxy.upstream.relay.splice`)
   until both sides have closed, the tunnel is idle too long, or it reaches its
   maximum lifetime;
5. then shuts the client socket down, so the server can neither write a
   response of its own on it nor keep it for another request, and returns:
   the access log writes the tunnel's line when the server closes the
   response, with the bytes each way (environ ``authproxy.tunnel_bytes_in``,
   ``authproxy.tunnel_bytes_out``) and why it ended (``authproxy.tunnel_end``).

Each tunnel holds the request's thread (gthread) or greenlet (gevent) for its
whole life.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..context import (
    IDENTITY,
    TUNNEL_BYTES_IN,
    TUNNEL_BYTES_OUT,
    TUNNEL_END,
    UPSTREAM_MS,
    UPSTREAM_URL,
    close_body,
    plain_response,
)
from ..context import refuse as _refuse
from ..errors import UpstreamError, UpstreamTimeout
from ..headers import UPGRADE_KEY, connection_tokens, end_to_end, has_ctl
from .client import client_socket, pipelined
from .failures import describe
from .relay import splice
from .transport import Response, Transport

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("authproxy.tunnel")

#: Seconds a tunnel outlives the token that opened it: a page that is open
#: when the token expires reconnects (and is sent to log in again) soon after.
TOKEN_GRACE = 5.0

#: Relays a non-101 answer as an ordinary response: (response, start_response, environ).
Relay = Callable[[Response, "StartResponse", "WSGIEnvironment"], Iterable[bytes]]


class Tunnel:
    """Relays an accepted HTTP/1.1 Upgrade between the client and the upstream.

    The :class:`~authproxy.upstream.forwarder.Forwarder` makes one (unless built with
    ``websocket=False``) and hands it every request that asks to upgrade.

    :param transport: the forwarder's :class:`~authproxy.upstream.transport.Transport`.
        Each tunnel gets a new connection made by its pool (so with its TLS
        settings and timeouts), never returned to it.
    :param idle_timeout: seconds without a byte in either direction after which
        the tunnel is closed; 0 or None: no limit.
    :param max_lifetime: seconds after which a tunnel is closed however busy; 0 or
        None: no limit.
    :param chunk_size: largest piece read at once in each direction.

    Example::

        tunnel = Tunnel(transport, idle_timeout=600.0)
    """

    def __init__(
        self,
        transport: Transport,
        *,
        idle_timeout: float | None = 3600.0,
        max_lifetime: float | None = 12 * 3600.0,
        chunk_size: int = 64 * 1024,
    ) -> None:
        self.transport = transport
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.chunk_size = chunk_size

    def __call__(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Any,
        chunked: bool,
        relay: Relay,
        *,
        extra: Iterable[tuple[str, str]] = (),
        upgrade: str | None = None,
    ) -> Iterable[bytes]:
        if upgrade is None:
            upgrade = environ[UPGRADE_KEY]
        if not (upgrade.isascii() and upgrade.isprintable() and upgrade.strip()):
            return _refuse(environ, start_response, 400, "Upgrade header not printable ASCII")
        client = client_socket(environ)
        if client is None:
            log.error(
                "cannot relay 'Upgrade: %s' for %s: this WSGI server offers no raw socket "
                "(gunicorn.socket or werkzeug.socket); serve with gunicorn, or set "
                "[upstream] websocket = false to forward such requests without the upgrade",
                upgrade[:40],
                environ.get("PATH_INFO", ""),
            )
            return _refuse(environ, start_response, 501, "upgrade needs the server's raw socket")
        headers = {**headers, "Connection": "Upgrade", "Upgrade": upgrade}
        # Lines a step added under authproxy.extra_headers, each on its own.
        lines = [*headers.items(), *extra]
        started = time.perf_counter()
        try:
            response = self.transport.send(method, target, lines, body, chunked, upgrade=True)
        except UpstreamError as exc:
            log.warning(
                "upstream %s failed: upgrade %s %s: %s",
                str(environ.get(UPSTREAM_URL, "")).partition("?")[0],  # a query may hold a secret
                method,
                target.partition("?")[0],
                describe(exc),
            )
            return plain_response(start_response, 504 if isinstance(exc, UpstreamTimeout) else 502)
        environ[UPSTREAM_MS] = (time.perf_counter() - started) * 1000.0
        conn = response.connection
        if response.status != 101:
            # Refused (401, 403, 426...): an ordinary answer on a connection that
            # stays plain HTTP, so the next request passes the pipeline again.
            return _Closing(relay(response, start_response, environ), conn)
        chosen = next((v for k, v in response.headers if k.lower() == "upgrade"), "")
        if not _accepts(chosen, upgrade) or conn.sock is None:
            conn.close()
            log.warning(
                "upstream answered 101 with Upgrade %r to a request for %r: not relayed",
                chosen[:40],
                upgrade[:40],
            )
            return plain_response(start_response, 502)
        return self._splice(environ, start_response, client, conn, response, chosen)

    def _splice(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        client: socket.socket,
        conn: Any,
        response: Response,
        chosen: str,
    ) -> TunnelBody:
        head, relayed = _head(response, chosen)
        # Tells the steps around us (access log) the status; the server itself
        # writes nothing of its own on this connection again.
        start_response("101 Switching Protocols", relayed)
        deadline = None
        if self.max_lifetime:
            deadline = time.monotonic() + self.max_lifetime
        expires = _token_expiry(environ)
        if expires is not None:
            # The tunnel acts on the token's authority: it ends when the token does.
            left = expires + TOKEN_GRACE - time.time()
            deadline = (
                min(deadline, time.monotonic() + left) if deadline else time.monotonic() + left
            )
        return TunnelBody(
            environ,
            client,
            conn,
            head + response.upgraded,
            idle_timeout=self.idle_timeout,
            deadline=deadline,
            chunk_size=self.chunk_size,
            protocol=chosen,
        )


class TunnelBody:
    """The body of a ``101``: the tunnel, relayed by the server or by iteration.

    A server with an event loop takes :attr:`tunnel` (this object) and relays
    the bytes itself, a socket rather than a thread for the tunnel's life: it
    sends :attr:`to_client` first, then bytes both ways between its client
    socket and :attr:`upstream` until both sides close, :attr:`idle_timeout`
    passes without a byte, or :attr:`deadline` (``time.monotonic()``) comes,
    then calls :meth:`finish` and ``close()``. Any other server iterates the
    body, and the relay runs in the iterating thread
    (:func:`~authproxy.upstream.relay.splice`); the client socket is then shut
    down, so the server cannot write a response of its own on it.
    """

    def __init__(
        self,
        environ: WSGIEnvironment,
        client: socket.socket,
        conn: Any,
        to_client: bytes,
        *,
        idle_timeout: float | None,
        deadline: float | None,
        chunk_size: int,
        protocol: str,
    ) -> None:
        self._environ = environ
        self._client = client
        self._conn = conn
        self.upstream: socket.socket = conn.sock
        self.to_client = to_client
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.chunk_size = chunk_size
        self.protocol = protocol

    @property
    def tunnel(self) -> TunnelBody:
        return self

    def __iter__(self) -> Iterator[bytes]:
        sent_up = sent_down = 0
        ended = "reset"
        try:
            self._client.sendall(self.to_client)
            now = time.monotonic()
            sent_up, sent_down, ended = splice(
                self._client,
                self.upstream,
                to_upstream=pipelined(self._environ),
                idle_timeout=self.idle_timeout,
                max_lifetime=None if self.deadline is None else max(0.001, self.deadline - now),
                chunk_size=self.chunk_size,
            )
        except OSError as exc:
            ended = "reset" if isinstance(exc, ConnectionError) else "error"
        finally:
            self.finish(sent_up, sent_down, ended)
            self._conn.close()
            _hang_up(self._client)
        return iter(())

    def finish(self, sent_up: int, sent_down: int, ended: str) -> None:
        """Record the tunnel's bytes each way and why it ended, for the access log."""
        environ = self._environ
        environ[TUNNEL_BYTES_IN] = sent_up
        environ[TUNNEL_BYTES_OUT] = sent_down
        environ[TUNNEL_END] = ended
        log.debug(
            "tunnel %s ended (%s): %d bytes in, %d out", self.protocol, ended, sent_up, sent_down
        )

    def close(self) -> None:
        self._conn.close()
        if TUNNEL_END not in self._environ:  # never relayed: the server gave up first
            self.finish(0, 0, "error")


def _token_expiry(environ: WSGIEnvironment) -> float | None:
    """When the verified token that let this request through expires (epoch seconds)."""
    identity = environ.get(IDENTITY)
    claims = getattr(identity, "claims", None)
    exp = claims.get("exp") if isinstance(claims, Mapping) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def _accepts(chosen: str, requested: str) -> bool:
    """True if every protocol in the 101's Upgrade was among those requested."""
    offered = connection_tokens(requested)
    picked = connection_tokens(chosen)
    return bool(picked) and all(p in offered for p in picked)


def _head(response: Response, chosen: str) -> tuple[bytes, list[tuple[str, str]]]:
    """The 101 head for the client, and its end-to-end headers (for start_response)."""
    relayed = [(k, v) for k, v in end_to_end(response.headers) if not (has_ctl(k) or has_ctl(v))]
    reason = response.reason or ""
    if has_ctl(reason) or not reason:
        reason = "Switching Protocols"
    lines = [
        f"HTTP/1.1 101 {reason}",
        *(f"{k}: {v}" for k, v in relayed),
        "Connection: Upgrade",
        f"Upgrade: {chosen}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), relayed


def _hang_up(sock: socket.socket) -> None:
    """End the client connection: whatever the server writes now fails, and it closes."""
    try:
        sock.setblocking(True)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Closing:
    """A response body that closes the upgrade's upstream connection when done."""

    __slots__ = ("_body", "_conn")

    def __init__(self, body: Iterable[bytes], conn: Any) -> None:
        self._body = body
        self._conn = conn

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close_body(self._body)
        finally:
            self._conn.close()
