"""HTTP/1.1 exchanges with the upstream, on connections from a urllib3 pool.

The pool (built by requests' adapter, so TLS verification, CA bundle and
client certificate are requests' own) opens and wraps the sockets; idle ones
wait in :class:`IdleConnections`.
Responses are parsed by llhttp through :mod:`httptools`, a C parser: the
standard library's parser costs more CPU than the rest of the proxy put
together. Requests are written as they came: the target is sent byte for
byte and no header is added.

A connection goes back to the pool only after a response was read to its end
and both sides agreed to keep it alive.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httptools
from urllib3.util.wait import wait_for_read

from ..context import status_phrase
from ..errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from .pool import new_connection, pool_maxsize

_HEAD_RECV = 64 * 1024
#: os.splice (Linux, Python 3.10+): a counted body can move socket to socket
#: inside the kernel (Response.splice_to).
_SPLICE = getattr(os, "splice", None)
#: The most one splice moves; the pipe between the sockets is grown to it.
SPLICE_SIZE = 1024 * 1024
#: Sockets whose timeouts can live in the kernel (see _set_timeouts); captured
#: at import, so a gevent-patched socket class is not among them.
_PLAIN_SOCKET = socket.socket
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NO_BODY_STATUS = frozenset({204, 304})
#: The most an upstream may send before its headers end (interim responses
#: included); more is a 502, never an ever-growing header list.
MAX_HEAD_BYTES = 1024 * 1024
# What a WSGI server accepts in a reason phrase (RFC 9112 4: HTAB / SP / VCHAR / obs-text).
_BAD_REASON = re.compile(r"[^\t\x20-\x7e\x80-\xff]")


class Response:
    """An upstream response: status and headers read, body still on the wire.

    ``headers`` keeps repeated fields (``Set-Cookie``) as separate pairs.
    ``length`` is the declared Content-Length, or None (chunked or until close).
    """

    __slots__ = (
        "status",
        "reason",
        "headers",
        "length",
        "_parser",
        "_sock",
        "_conn",
        "_pool",
        "_pending",
        "_headers_done",
        "_complete",
        "_no_body",
        "_close_delimited",
        "_released",
        "_keep_alive",
        "_received",
        "_recv_size",
        "_timeout",
        "before_read",
        "upgraded",
    )

    def __init__(
        self,
        conn: Any,
        pool: Any,
        no_body: bool,
        recv_size: int,
        read_timeout: float | None = None,
    ) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.length: int | None = None
        self._conn = conn
        self._pool = pool
        self._sock: socket.socket = conn.sock
        self._parser = httptools.HttpResponseParser(self)
        self._pending: list[bytes] = []
        self._headers_done = False
        self._complete = False
        self._no_body = no_body
        self._close_delimited = False
        self._released = False
        self._keep_alive = False
        self._received = 0
        self._recv_size = recv_size
        self._timeout = read_timeout
        #: Called before each blocking read of the body (e.g. to watch the client).
        self.before_read: Callable[[], None] | None = None
        #: After a ``101``: the bytes that came behind its head (the new protocol's).
        self.upgraded = b""

    # -- httptools callbacks -------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response (100 Continue, 103 Early Hints): WSGI cannot
            # relay it; the final response follows.
            self.headers = []
            self.reason = ""
            return
        if status < 100:
            raise UpstreamProtocolError(f"status {status} from upstream")
        if _BAD_REASON.search(self.reason):
            # Control characters in the reason phrase: the server would refuse
            # the status line; the code is what matters, use its usual phrase.
            self.reason = status_phrase(status)
        self.status = status
        self._headers_done = True
        lengths: set[str] = set()
        chunked = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                lengths.update(v.strip() for v in value.split(","))
            elif lower == "transfer-encoding":
                chunked = True
        if lengths:
            # Framing the upstream got wrong must not reach the client: one
            # length, once, and never next to Transfer-Encoding (which wins).
            self.headers = [(n, v) for n, v in self.headers if n.lower() != "content-length"]
            if not chunked:
                value = lengths.pop()
                if lengths or not (value.isascii() and value.isdigit()):
                    raise UpstreamProtocolError("malformed Content-Length from upstream")
                self.length = int(value)
                self.headers.append(("Content-Length", value))
        self._keep_alive = self._parser.should_keep_alive()
        if self._no_body or status in _NO_BODY_STATUS or status == 101:
            self._no_body = True
            self._complete = True
        elif self.length is None and not chunked:
            self._close_delimited = True

    def on_body(self, data: bytes) -> None:
        self._pending.append(data)
        self._received += len(data)

    def on_message_complete(self) -> None:
        if self._headers_done:
            self._complete = True
            # Ask now: the parser forgets once this callback returns.
            self._keep_alive = self._keep_alive and self._parser.should_keep_alive()

    # -- reading -------------------------------------------------------------

    def _read(self, size: int) -> bytes:
        """One read of the body; b"" at the end of the stream.

        Waits through *before_read* (whose errors pass through unchanged) only
        when the read would block; a socket error drops the connection and
        becomes an upstream error.
        """
        try:
            data = self._recv_ready(size)
        except OSError as exc:
            self.close()
            raise _body_error(exc) from exc
        if data is not None:
            return data
        if self.before_read is not None:
            self.before_read()
        try:
            return self._sock.recv(size)
        except OSError as exc:
            self.close()
            raise _body_error(exc) from exc

    def _recv_ready(self, size: int) -> bytes | None:
        """What a read finds without waiting, or None if it would have to wait.

        While bytes keep coming, *before_read* (a selector watching the client
        too) is not needed: only a read that would block waits through it.
        Plain sockets only; others always go through *before_read*.
        """
        if self.before_read is None or type(self._sock) is not _PLAIN_SOCKET:
            return None
        try:
            return self._sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def _parse(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # A 101: the rest of the stream is the new protocol's, not HTTP.
            self.upgraded = data[upgrade.args[0] :]
            self._complete = True

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def read_timeout(self) -> float | None:
        """Seconds the upstream may stay silent mid-body."""
        return self._timeout

    @property
    def connection(self) -> Any:
        return self._conn

    def buffered(self) -> bool:
        """True if reading the body can go on without waiting for the upstream."""
        if self._pending or self._complete:
            return True
        pending = getattr(self._sock, "pending", None)  # TLS: decrypted, not yet read
        return bool(pending is not None and pending() > 0)

    def read_head(self) -> None:
        received = 0
        while not self._headers_done:
            if received > MAX_HEAD_BYTES:
                raise UpstreamProtocolError(f"upstream headers larger than {MAX_HEAD_BYTES} bytes")
            # A head (and a small body behind it) fits in 64 KiB: asking for
            # more would make every small answer allocate and free a large
            # buffer (an mmap and munmap per request).
            data = self._sock.recv(_HEAD_RECV)
            if not data:
                raise ConnectionResetError("upstream closed the connection before answering")
            received += len(data)
            self._parse(data)

    @property
    def complete(self) -> bool:
        return self._complete

    def take(self) -> bytes:
        """The body received so far (all of it, once :attr:`complete`)."""
        data = b"".join(self._pending) if len(self._pending) != 1 else self._pending[0]
        self._pending.clear()
        return data

    def read_all(self) -> bytes:
        chunks = []
        for chunk in self:
            chunks.append(chunk)
        return b"".join(chunks)

    def __iter__(self) -> Iterator[bytes]:
        """The body, piece by piece as it arrives. Raises on a truncated body."""
        if self.length is not None and not self._complete:
            return self._iter_counted(self.length)
        return self._iter_parsed()

    def _iter_counted(self, length: int) -> Iterator[bytes]:
        # A declared length needs no parser: count the bytes off the socket.
        if self._pending:
            yield self.take()
        remaining = length - self._received
        size = self._recv_size
        while remaining > 0:
            data = self._read(remaining if remaining < size else size)
            if not data:
                self.close()
                raise UpstreamProtocolError("upstream closed the connection mid-body")
            remaining -= len(data)
            yield data
        self._complete = True
        self.release()

    def _iter_parsed(self) -> Iterator[bytes]:
        pending = self._pending
        while True:
            if pending:
                if len(pending) == 1:
                    yield pending.pop()
                else:
                    data = b"".join(pending)
                    pending.clear()
                    yield data
            if self._complete:
                self.release()
                return
            data = self._read(self._recv_size)
            if data:
                try:
                    self._parse(data)
                except httptools.HttpParserError as exc:
                    self.close()
                    raise UpstreamProtocolError(f"malformed body from upstream: {exc}") from exc
            else:
                if self._close_delimited:  # the end of the stream is the end of the body
                    self._complete = True
                    continue
                self.close()
                raise UpstreamProtocolError("upstream closed the connection mid-body")

    # -- without waiting (a server's event loop) -----------------------------------

    def read_nowait(self) -> bytes | None:
        """The body bytes that can be had without waiting: ``b""`` if none have
        come yet, None once the body has ended (the connection is then released).

        For a server that relays the body from its event loop (it waits for
        :attr:`sock` to turn readable between calls) instead of holding a thread
        in :meth:`__iter__`. Framing is removed as in iteration; a truncated or
        malformed body raises an upstream error and drops the connection. Call
        it until it returns ``b""`` before waiting again: a TLS socket may hold
        decrypted bytes that readiness does not show.
        """
        while True:
            if self._pending:
                return self.take()
            if self._complete:
                self.release()
                return None
            size = self._recv_size
            if self.length is not None:
                size = min(size, self.length - self._received)
            try:
                if type(self._sock) is _PLAIN_SOCKET:
                    data = self._sock.recv(size, socket.MSG_DONTWAIT)
                else:
                    self._sock.setblocking(False)  # the pool sets its timeout again on reuse
                    data = self._sock.recv(size)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return b""
            except OSError as exc:
                self.close()
                raise _body_error(exc) from exc
            if not data:
                if self._close_delimited:
                    self._complete = True
                    continue
                self.close()
                raise UpstreamProtocolError("upstream closed the connection mid-body")
            if self.length is not None:
                self._received += len(data)
                self._complete = self._received >= self.length
                return data
            try:
                self._parse(data)
            except httptools.HttpParserError as exc:
                self.close()
                raise UpstreamProtocolError(f"malformed body from upstream: {exc}") from exc

    # -- socket to socket --------------------------------------------------------

    def can_splice(self) -> bool:
        """True if the rest of the body can go to a socket through :meth:`splice_to`:
        a declared length, a plain (not TLS) socket, and a kernel that splices."""
        return (
            _SPLICE is not None
            and self.length is not None
            and not self._complete
            and type(self._sock) is _PLAIN_SOCKET
        )

    def splice_to(self, client: socket.socket, length: int, head: bytes = b"") -> Iterator[int]:
        """Move the body to *client* inside the kernel; yield the bytes of each move.

        For a body with a declared length (see :meth:`can_splice`), none of it
        handed out yet. *length* is what the server told the client to expect:
        unless it is the body's length, ValueError, at once. *head* (the
        server's response head) goes out with the first body bytes. The bytes go
        from the upstream socket through a pipe to *client* (``splice(2)``) and
        never become Python objects: no copies in and out, one pass of the
        interpreter per megabyte. Each move passes on what has arrived, so a
        slow body flows as it comes. The waiting is iteration's: *before_read*
        when the upstream is quiet, then at most the read timeout. Upstream
        failures end it as upstream errors; errors writing to *client* pass
        through unchanged. The connection is released once the body is read.
        """
        if length != self.length:
            raise ValueError(f"the client expects {length} bytes, the body has {self.length}")
        return self._splice(client, head)

    def _splice(self, client: socket.socket, head: bytes) -> Iterator[int]:
        assert _SPLICE is not None and self.length is not None
        if self._pending:
            data = self.take()
            client.sendall(head + data)
            yield len(data)
        elif head:
            client.sendall(head, socket.MSG_MORE)  # out with the first spliced bytes
        remaining = self.length - self._received
        upstream = self._sock
        pipe = _PIPES.take()
        read_end, write_end = pipe
        emptied = False
        try:
            upstream.setblocking(False)  # a read takes what is there, never waits for more
            source, sink = upstream.fileno(), client.fileno()
            while remaining > 0:
                try:
                    moved = _SPLICE(source, write_end, min(remaining, SPLICE_SIZE))
                except BlockingIOError:
                    self._wait_for_upstream()
                    continue
                except OSError as exc:
                    self.close()
                    raise _body_error(exc) from exc
                if not moved:
                    self.close()
                    raise UpstreamProtocolError("upstream closed the connection mid-body")
                remaining -= moved
                self._received += moved
                left = moved
                while left:
                    left -= _SPLICE(read_end, sink, left)
                yield moved
            self._complete = True
            emptied = True
        finally:
            _PIPES.give(pipe, emptied)
            if upstream.fileno() != -1:
                upstream.setblocking(True)
        self.release()

    def _wait_for_upstream(self) -> None:
        if self.before_read is not None:
            self.before_read()  # watches the client too
        if not wait_for_read(self._sock, self._timeout):
            self.close()
            raise UpstreamTimeout("upstream stalled mid-body")

    # -- the connection --------------------------------------------------------

    def release(self) -> None:
        """Give the connection back: to the pool if reusable, else closed."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if self._pool is None:  # not pooled: the caller owns the connection
            return
        if not (self._complete and self._keep_alive):
            conn.close()
        self._pool.put(conn)

    def close(self) -> None:
        """Drop the connection (the body may be unread).

        Once released the connection is the pool's, and may already carry
        another request on a new socket: closing it then would cut that one.
        """
        if self._released:
            return
        if not self._complete:
            self._conn.close()
        self.release()

    # -- what requests.Response asks of its raw (see authproxy.upstream.adapter) --

    def stream(self, amt: int | None = None, decode_content: bool | None = None) -> Iterator[bytes]:
        """The body as it arrives, for :meth:`requests.Response.iter_content`.

        Pieces are as large as the upstream sends them (at most the transport's
        read size), whatever *amt*; the bytes are the upstream's, never decoded,
        whatever *decode_content*.
        """
        return iter(self)

    def release_conn(self) -> None:
        """:meth:`release`, under the name :meth:`requests.Response.close` calls."""
        self.release()


def encode_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and header block, as the client's bytes (WSGI strings are latin-1)."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append("\r\n")
    head = "\r\n".join(lines)
    # Nothing built here may start a new line or smuggle a NUL.
    if head.count("\n") != len(lines) or "\0" in head or head.count("\r") != len(lines):
        raise ValueError("CR, LF or NUL in a request header")
    return head.encode("latin-1")


class IdleConnections:
    """A urllib3 pool's connections between requests, newest first, taken without a lock.

    urllib3 keeps them in a :class:`queue.LifoQueue`, whose lock every request
    takes twice: under a threaded server such a lock makes the threads queue up
    behind whichever of them the GIL interrupted while holding it. Here they
    sit in a :class:`collections.deque`, whose ``append`` and ``pop`` are
    atomic. New connections come from *pool* (its TLS settings); at most
    *maxsize* idle ones are kept, the rest closed. As with urllib3, a kept
    connection that the upstream has closed is reconnected before use.
    """

    def __init__(self, pool: Any, maxsize: int) -> None:
        self.pool = pool
        self.maxsize = maxsize
        self._idle: deque[Any] = deque()

    def get(self) -> Any:
        """An idle connection, newest first, or a new one."""
        try:
            conn = self._idle.pop()
        except IndexError:
            return new_connection(self.pool)
        if conn.sock is not None and wait_for_read(conn.sock, 0.0):  # urllib3's check
            conn.close()  # the exchange connects it again
        return conn

    def put(self, conn: Any) -> None:
        """Keep *conn* for the next request, or close it when enough wait."""
        if len(self._idle) < self.maxsize:
            self._idle.append(conn)
        else:
            conn.close()

    def new(self) -> Any:
        """A new connection that is never kept (an upgrade's)."""
        return new_connection(self.pool)

    def __len__(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            conn.close()


class Transport:
    """Sends requests over a urllib3 connection pool; see the module docstring."""

    def __init__(
        self,
        pool: Any,
        connect_timeout: float | None,
        read_timeout: float | None,
        recv_size: int = 256 * 1024,
        pool_size: int | None = None,
    ) -> None:
        #: urllib3's pool opens connections; idle ones are kept here.
        self.pool = IdleConnections(pool, pool_size or pool_maxsize(pool))
        self.recv_size = recv_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: Iterable[bytes] | bytes | None,
        chunked: bool,
        *,
        upgrade: bool = False,
    ) -> Response:
        """Send a request on a pooled connection and read the response head.

        With *upgrade*, on a new connection the pool never sees, which alone
        may switch protocols: the caller closes ``response.connection`` when
        done with it. A ``101`` to any other request is an upstream error.
        """
        head = _head(method, target, headers, chunked)
        if upgrade:
            return self._exchange(self.pool.new(), None, method, head, body, chunked)
        pool = self.pool
        for attempt in (0, 1):
            conn = pool.get()
            reused = conn.sock is not None
            try:
                response = self._exchange(conn, pool, method, head, body, chunked)
            except BaseException as exc:
                # A kept-alive connection that turned out dead before anything
                # was answered: send once more on a fresh one, when it is safe.
                if (
                    attempt == 0
                    and reused
                    and body is None
                    and method in _IDEMPOTENT
                    and isinstance(exc.__cause__, ConnectionError)
                ):
                    continue
                raise
            if response.status == 101:
                # The connection now speaks another protocol: never reuse it.
                response.connection.close()
                response.close()
                raise UpstreamProtocolError("upstream switched protocols unasked")
            return response
        raise AssertionError("unreachable")

    def _exchange(
        self, conn: Any, pool: Any, method: str, head: bytes, body: Any, chunked: bool
    ) -> Response:
        """Write the request on *conn* and read the response head; on any failure
        the connection is closed (and given back to *pool*) and an upstream error raised."""
        response = None
        try:
            sock = conn.sock
            if sock is None:
                conn.timeout = self.connect_timeout
                conn.connect()
                _set_timeouts(conn.sock, self.read_timeout)
            elif type(sock) is not _PLAIN_SOCKET:
                sock.settimeout(self.read_timeout)
            response = Response(conn, pool, method == "HEAD", self.recv_size, self.read_timeout)
            _write(conn.sock, head, body, chunked)
            response.read_head()
            return response
        except BaseException as exc:
            conn.close()
            if response is not None:
                response.release()
            elif pool is not None:
                pool.put(conn)
            error = _upstream_error(exc)
            if error is exc:
                raise
            raise error from exc


def _set_timeouts(sock: socket.socket, timeout: float | None) -> None:
    """Give a new upstream connection its read and write timeout.

    A plain socket gets them as SO_RCVTIMEO/SO_SNDTIMEO and stays in blocking
    mode: Python polls before every send and receive on a socket with a
    timeout of its own, two more system calls per request, each one a chance
    for another thread to take the GIL. A timeout then surfaces as
    :class:`BlockingIOError`. TLS sockets (OpenSSL would retry a timed-out read
    forever) and cooperative ones (gevent) keep Python's timeout.
    """
    if type(sock) is not _PLAIN_SOCKET or timeout is None:
        sock.settimeout(timeout)
        return
    sock.settimeout(None)
    seconds = int(timeout)
    tv = struct.pack("@ll", seconds, int((timeout - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class _Pipes:
    """The pipes splices go through, kept between bodies, empty.

    A new pipe costs four system calls (made, grown, two ends closed), each
    a chance for another thread to take the GIL: more than the two splices a
    megabyte takes. A pipe comes back only when its splice ended with
    nothing in it; at most *keep* wait. A forked child closes its parent's.
    """

    def __init__(self, keep: int) -> None:
        self._idle: deque[tuple[int, int]] = deque()
        self._keep = keep

    def take(self) -> tuple[int, int]:
        try:
            return self._idle.pop()
        except IndexError:
            pass
        read_end, write_end = os.pipe()
        try:  # to SPLICE_SIZE (fewer, larger moves); its default is 64 KiB
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, SPLICE_SIZE)
        except (OSError, AttributeError):  # over the user's pipe quota: the default will do
            pass
        return read_end, write_end

    def give(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            _close_pipe(pipe)

    def close(self) -> None:
        while self._idle:
            _close_pipe(self._idle.pop())


def _close_pipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


_PIPES = _Pipes(keep=64)
os.register_at_fork(after_in_child=_PIPES.close)


def _timed_out(exc: BaseException) -> bool:
    # BlockingIOError: a kernel timeout on a blocking socket (_set_timeouts).
    return isinstance(exc, (TimeoutError, BlockingIOError))


def _head(method: str, target: str, headers: Iterable[tuple[str, str]], chunked: bool) -> bytes:
    if chunked:
        headers = [*headers, ("Transfer-Encoding", "chunked")]
    return encode_head(method, target, headers)


def _write(sock: socket.socket, head: bytes, body: Any, chunked: bool) -> None:
    if body is None or isinstance(body, bytes):
        sock.sendall(head + body if body else head)
        return
    sock.sendall(head)
    if chunked:
        for chunk in body:
            if chunk:
                sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
    else:
        for chunk in body:
            sock.sendall(chunk)


def _body_error(exc: OSError) -> Exception:
    if _timed_out(exc):
        return UpstreamTimeout("upstream stalled mid-body")
    return UpstreamProtocolError(f"upstream body failed: {type(exc).__name__}")


def _upstream_error(exc: BaseException) -> BaseException:
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, SSLError

    if isinstance(exc, (UpstreamConnectError, UpstreamTimeout, UpstreamProtocolError)):
        return exc
    # urllib3's NewConnectionError (refused, unreachable) subclasses
    # ConnectTimeoutError for history's sake: it is no timeout.
    if (isinstance(exc, ConnectTimeoutError) or _timed_out(exc)) and not isinstance(
        exc, NewConnectionError
    ):
        return UpstreamTimeout("TimeoutError" if isinstance(exc, OSError) else type(exc).__name__)
    if isinstance(exc, httptools.HttpParserError):
        return UpstreamProtocolError(f"malformed response from upstream: {exc}")
    if isinstance(exc, (NewConnectionError, SSLError, OSError)):
        return UpstreamConnectError(type(exc).__name__)
    return exc
