"""The one place authproxy steps outside WSGI: the server's raw client socket.

WSGI has no way to say "the client hung up" or "this connection is now a
WebSocket". Servers that allow it put the connection's socket in the environ
(``gunicorn.socket``, ``werkzeug.socket``); authproxy uses it for two things:

* :class:`UpstreamWait`: while a streamed response waits for the upstream's
  next bytes, notice a client that has gone away, so the upstream response is
  closed at once rather than when the upstream next writes (a quiet watch or
  log-follow may not write for minutes);
* :func:`client_socket` and :func:`pipelined`: what a WebSocket tunnel needs
  (see :mod:`authproxy.tunnel`; the copying itself is :mod:`authproxy.splice`).
"""

from __future__ import annotations

import errno
import selectors
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from ..errors import UpstreamTimeout

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: environ keys under which servers offer the connection's socket, in order.
SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class ClientGone(BrokenPipeError):
    """The client closed its connection while the response was still coming.

    A :class:`BrokenPipeError` on purpose: every WSGI server treats it as a
    client that went away (gunicorn logs it at debug level, werkzeug drops
    the connection), never as an application error to answer with a 500.
    """

    def __init__(self) -> None:
        super().__init__(errno.EPIPE, "the client closed the connection")


def client_socket(environ: WSGIEnvironment) -> socket.socket | None:
    """The raw socket of the client connection, if the server offers one."""
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def pipelined(environ: WSGIEnvironment) -> bytes:
    """Bytes the client sent after the request that the server has already read.

    gunicorn reads ahead into its parser's buffer; a tunnel must relay those
    bytes too. Other servers' read-ahead is not reachable (a WebSocket client
    waits for the ``101`` before it sends, so there is none in practice).
    """
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    unreader = getattr(reader, "unreader", None)
    if unreader is None:
        unreader = getattr(getattr(reader, "req", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    if take is None:
        return b""
    data = take()
    return data if isinstance(data, bytes) else b""


def client_gone(sock: socket.socket) -> bool | None:
    """After *sock* turned readable: True if the client hung up, False if it
    sent more (a pipelined request), None if that cannot be told (TLS)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except _WOULD_BLOCK:
        return False
    except (ConnectionError, TimeoutError):
        return True
    except (ValueError, OSError):  # SSLSocket refuses flags
        return None


class UpstreamWait:
    """Waits for the next bytes of a streamed upstream body, watching the client.

    Made by :meth:`create` for a :class:`~authproxy.upstream.transport.Response`;
    :meth:`wait` returns once a read will not block, raises
    :class:`ClientGone` when the client hangs up first, and
    :class:`~authproxy.errors.UpstreamTimeout` after *timeout* seconds of
    silence. A client that pipelines its next request is no longer watched.
    """

    __slots__ = ("_response", "_upstream", "_client", "_timeout", "_selector")

    def __init__(
        self, response: Any, upstream: socket.socket, client: socket.socket, timeout: float
    ) -> None:
        self._response = response
        self._upstream = upstream
        self._client: socket.socket | None = client
        self._timeout = timeout
        self._selector: selectors.BaseSelector | None = None

    @classmethod
    def create(cls, response: Any, environ: WSGIEnvironment, timeout: float) -> UpstreamWait | None:
        """None when the server offers no socket to watch."""
        client = client_socket(environ)
        if client is None:
            return None
        return cls(response, response.sock, client, timeout)

    def wait(self) -> None:
        # The transport reads the socket itself, with no buffer of its own: a
        # readable socket (or bytes already parsed) means the read won't block.
        if self._client is None or self._response.buffered():
            return
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._upstream, selectors.EVENT_READ)
            self._selector.register(self._client, selectors.EVENT_READ)
        deadline = time.monotonic() + self._timeout
        while self._client is not None:
            events = self._selector.select(max(0.0, deadline - time.monotonic()))
            if not events:
                raise UpstreamTimeout(f"no bytes from the upstream for {self._timeout} s")
            if any(key.fileobj is self._upstream for key, _ in events):
                return
            gone = client_gone(self._client)
            if gone:
                raise ClientGone()
            self._selector.unregister(self._client)
            self._client = None

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
