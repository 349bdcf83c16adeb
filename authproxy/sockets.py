"""The one place authproxy steps outside WSGI: the server's raw client socket.

WSGI has no way to say "the client hung up" or "this connection is now a
WebSocket". Servers that allow it put the connection's socket in the environ
(``gunicorn.socket``, ``werkzeug.socket``); authproxy uses it for two things:

* :class:`UpstreamWait`: while a streamed response waits for the upstream's
  next bytes, notice a client that has gone away, so the upstream response is
  closed at once rather than when the upstream next writes (a quiet watch or
  log-follow may not write for minutes);
* :func:`splice`: relay bytes both ways between the client and the upstream
  once an Upgrade has been accepted (see :mod:`authproxy.tunnel`).
"""

from __future__ import annotations

import errno
import selectors
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from .errors import UpstreamTimeout

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

    Made by :meth:`create` from a ``urllib3`` response read with
    ``preload_content=False``; :meth:`wait` returns once a read will not block,
    raises :class:`ClientGone` when the client hangs up first, and
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
        """None when the server offers no socket or the response's socket can't be reached."""
        client = client_socket(environ)
        upstream = getattr(getattr(_reader(response), "raw", None), "_sock", None)
        if client is None or not isinstance(upstream, socket.socket):
            return None
        return cls(response, upstream, client, timeout)

    def wait(self) -> None:
        if self._client is None or self._readable():
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

    def _readable(self) -> bool:
        """True if the next read finds body bytes (or the body's end) already here."""
        body = getattr(self._response, "_fp", None)  # http.client's response
        reader = getattr(body, "fp", None)
        if reader is None:
            return True  # body done: the next read returns at once
        pending = getattr(self._upstream, "pending", None)  # TLS: decrypted, not yet read
        try:
            if pending is not None and pending() > 0:
                return True
            data = peek(reader, self._upstream)
        except (OSError, ValueError):
            return True  # the read will report it
        if not data:
            return False
        if not getattr(body, "chunked", False):
            return True
        # Chunked: the previous chunk's CRLF and the next size line come first.
        # http.client's chunk_left: None before the first chunk, 0 between chunks.
        left = getattr(body, "chunk_left", None)
        lines = 0 if left else 1 if left is None else 2
        return data.count(b"\n") >= lines

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None


def _reader(response: Any) -> Any:
    # urllib3's response -> http.client's response -> its buffered socket reader.
    return getattr(getattr(response, "_fp", None), "fp", None)


def peek(reader: Any, sock: socket.socket) -> bytes:
    """What *reader* (a buffered reader on *sock*) holds or can get without waiting."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        data = reader.peek(1)
    except _WOULD_BLOCK:
        return b""
    finally:
        sock.settimeout(timeout)
    return data if isinstance(data, bytes) else b""


def take_buffered(response: Any, sock: socket.socket) -> bytes:
    """The bytes a urllib3 *response*'s reader holds beyond the response head.

    An upstream may send its first WebSocket frame right behind the ``101``;
    http.client has read it into its buffer, and it belongs to the tunnel.
    """
    reader = _reader(response)
    if reader is None:
        return b""
    data = peek(reader, sock)
    return bytes(reader.read(len(data))) if data else b""


def splice(
    client: socket.socket,
    upstream: socket.socket,
    *,
    to_upstream: bytes = b"",
    to_client: bytes = b"",
    idle_timeout: float | None = None,
    max_lifetime: float | None = None,
    chunk_size: int = 64 * 1024,
) -> tuple[int, int, str]:
    """Relay bytes both ways until both directions have ended; one thread, bounded memory.

    *to_upstream* and *to_client* are sent first (bytes already read on the
    other side). A side that closes its sending direction is passed on as a
    half-close (``shutdown(SHUT_WR)``) and the other direction keeps going;
    TLS offers no half-close, so towards a TLS peer the tunnel instead waits
    for that peer to close. At most one chunk per direction is held: a side
    that stops reading stops the other side's sending.

    Returns (bytes to the upstream, bytes to the client, why it ended):
    ``"closed"``, ``"idle"`` (nothing moved for *idle_timeout* seconds),
    ``"lifetime"`` (*max_lifetime* reached), ``"reset"`` or ``"error"``.
    """
    flows = (
        _Flow(client, upstream, to_upstream, chunk_size),
        _Flow(upstream, client, to_client, chunk_size),
    )
    started = last = time.monotonic()
    end_of_life = started + max_lifetime if max_lifetime else None
    selector = selectors.DefaultSelector()
    registered: dict[socket.socket, int] = {}
    ended = "closed"
    client.setblocking(False)
    upstream.setblocking(False)
    try:
        while True:
            moved = False
            for flow in flows:
                if not flow.done:
                    moved = flow.step() or moved
            now = time.monotonic()
            if moved:
                last = now
            if flows[0].done and flows[1].done:
                break
            deadlines = [end_of_life] if end_of_life is not None else []
            if idle_timeout:
                deadlines.append(last + idle_timeout)
            if deadlines and now >= min(deadlines):
                ended = "lifetime" if end_of_life is not None and now >= end_of_life else "idle"
                break
            if any(not f.done and f.wait is None for f in flows):
                continue  # a flow stopped for fairness, not to wait
            wanted: dict[socket.socket, int] = {}
            for flow in flows:
                if not flow.done and flow.wait is not None:
                    sock, event = flow.wait
                    wanted[sock] = wanted.get(sock, 0) | event
            _watch(selector, registered, wanted)
            selector.select(min(deadlines) - now if deadlines else None)
    except ConnectionError:
        ended = "reset"
    except OSError:
        ended = "error"
    finally:
        selector.close()
    return flows[0].moved, flows[1].moved, ended


class _Flow:
    """One direction of a tunnel: read from *src*, write to *dst*, one chunk in hand."""

    __slots__ = ("src", "dst", "pending", "moved", "eof", "done", "wait", "chunk_size")

    def __init__(self, src: socket.socket, dst: socket.socket, first: bytes, chunk_size: int):
        self.src = src
        self.dst = dst
        self.pending = memoryview(first)
        self.moved = 0
        self.eof = False
        self.done = False
        #: (socket, selector event) this flow waits for; None: not waiting.
        self.wait: tuple[socket.socket, int] | None = None
        self.chunk_size = chunk_size

    def step(self, rounds: int = 16) -> bool:
        """Move what moves without blocking (at most *rounds* chunks); True if any byte did."""
        moved = False
        self.wait = None
        for _ in range(rounds):
            if self.pending:
                try:
                    sent = self.dst.send(self.pending)
                except ssl.SSLWantReadError:
                    self.wait = (self.dst, selectors.EVENT_READ)
                    return moved
                except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                    self.wait = (self.dst, selectors.EVENT_WRITE)
                    return moved
                self.pending = self.pending[sent:]
                self.moved += sent
                moved = True
                continue
            if self.eof:
                self._half_close()
                self.done = True
                return moved
            try:
                data = self.src.recv(self.chunk_size)
            except ssl.SSLWantWriteError:
                self.wait = (self.src, selectors.EVENT_WRITE)
                return moved
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                self.wait = (self.src, selectors.EVENT_READ)
                return moved
            if data:
                self.pending = memoryview(data)
                moved = True
            else:
                self.eof = True
        return moved

    def _half_close(self) -> None:
        if isinstance(self.dst, ssl.SSLSocket):
            return  # shutdown() would drop the TLS layer for the other direction too
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: the other direction will notice


def _watch(
    selector: selectors.BaseSelector,
    registered: dict[socket.socket, int],
    wanted: dict[socket.socket, int],
) -> None:
    for sock in [s for s in registered if s not in wanted]:
        selector.unregister(sock)
        del registered[sock]
    for sock, events in wanted.items():
        if sock not in registered:
            selector.register(sock, events)
        elif registered[sock] != events:
            selector.modify(sock, events)
        registered[sock] = events
