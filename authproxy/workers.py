"""The gunicorn worker ``authproxy serve`` runs for ``worker_class = "gthread"``."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from typing import Any

from gunicorn.http import wsgi
from gunicorn.http.body import LengthReader
from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker
from urllib3.util.wait import wait_for_read


class ThreadWorker(_GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, with housekeeping that is not per request.

    gunicorn's worker touches its heartbeat file (a ``utime`` system call) and
    asks whether its parent changed on every turn of its event loop, which
    under load is every request or two. The arbiter only needs to hear from a
    worker within ``timeout`` seconds: this one touches the file at most every
    quarter of that and at least once a second, and looks for its parent once
    a second. Its responses are :class:`Response`.

    gunicorn hands a kept-alive connection back to its event loop after each
    response, and a thread of its pool takes it up again when the next
    request comes: three thread wake-ups and six system calls per request,
    each a chance for the GIL to change hands. While the worker has no more
    connections than threads (each could have a thread of its own, so none
    waits for one), the thread that answered keeps the connection and serves
    the next request that comes within :attr:`linger` seconds; then, or when
    the worker is stopping, the connection goes back to the event loop.
    A request already read behind the last one (pipelined) is served at once.

    A response body that offers ``splice_to`` (a large upstream body with a
    declared length, from a plain-TCP upstream) goes from the upstream's socket
    to the client's inside the kernel (``splice(2)``), unless the client
    connection is TLS or gunicorn's ``sendfile`` setting is off.

    With each heartbeat (glibc only) it also hands memory that its threads'
    malloc arenas hold free back to the system (``malloc_trim``): each thread
    gets an arena of its own, and bodies passing through in pieces of varying
    size leave them full of free pages, adding up to several MiB per thread.
    """

    #: Seconds a thread waits on its connection for the next request.
    linger = 0.1
    _last_notify = float("-inf")
    _last_parent_check = float("-inf")
    wsgi: Callable[..., Iterable[bytes]]

    def init_process(self) -> None:
        # gunicorn's wsgi.create() looks its response class up at call time.
        wsgi.Response = Response
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _offering_splice(self.wsgi)

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._last_notify >= min(1.0, self.timeout / 4):
            self._last_notify = now
            super().notify()
            if _malloc_trim is not None:
                _malloc_trim(0)

    def handle(self, conn: Any) -> Any:
        keepalive = super().handle(conn)
        while keepalive is True and self._next_request(conn):
            keepalive = super().handle(conn)
        return keepalive

    def _next_request(self, conn: Any) -> bool:
        """True when the connection's next request is here and this thread should serve it."""
        if not self.alive or conn.is_http2:
            return False
        if conn.parser.unreader.buf.getvalue():  # read along with the last request
            return True
        return self.nr_conns <= self.cfg.threads and wait_for_read(conn.sock, self.linger)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # gunicorn drains what the application left of the request body under
        # a timeout, setting and restoring it (two system calls) even when the
        # body is empty or was read to its end, as for nearly every request.
        if keepalive and _body_read(conn.parser.mesg):
            return True
        return bool(super()._keepalive_after(conn, keepalive))

    def is_parent_alive(self) -> bool:
        now = time.monotonic()
        if now - self._last_parent_check < 1.0:
            return True
        self._last_parent_check = now
        return bool(super().is_parent_alive())


class Response(wsgi.Response):  # type: ignore[misc]
    """gunicorn's HTTP/1 response, sending its head together with the first body bytes.

    gunicorn writes the head and each body piece with separate system calls,
    so a small answer leaves in two packets. Here the head waits for the first
    piece of body (or for the end) and both go in one ``sendall``.
    """

    headers_sent: bool
    _head = b""
    _joining = False

    def default_headers(self) -> list[str]:
        # gunicorn's, with the Date made once a second rather than per response.
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        major, minor = self.req.version
        headers = [
            f"HTTP/{major}.{minor} {self.status}\r\n",
            f"Server: {self.version}\r\n",
            f"Date: {_http_date()}\r\n",
            f"Connection: {connection}\r\n",
        ]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        if not self._joining:
            super().send_headers()
            return
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self._head = ("".join(lines) + "\r\n").encode("latin-1")
        self.headers_sent = True

    def write(self, arg: bytes) -> None:
        self._joining = True
        try:
            super().write(arg)
        finally:
            self._joining = False
            if self._head:  # no body went out with it (HEAD, 204, an empty piece...)
                head, self._head = self._head, b""
                self.sock.sendall(head)

    def sendfile(self, respiter: Any) -> bool:
        # A body that can move socket to socket (see _offering_splice), when
        # its bytes go to the client as they are: a declared length, no TLS.
        if not isinstance(respiter, _Spliceable):
            return bool(super().sendfile(respiter))
        if (
            self.cfg.is_ssl
            or not self.can_sendfile()
            or self.chunked
            or self.response_length is None
            or self._omits_body
        ):
            return False
        self._joining = True
        try:
            self.send_headers()
        finally:
            self._joining = False
        head, self._head = self._head, b""
        try:
            # Exactly the bytes the head announces: a Content-Length that a
            # step changed (and that iteration would enforce) declines.
            moves = respiter.splice_to(self.sock, self.response_length, head)
        except ValueError:
            self.headers_sent = False  # iterated instead: the head goes with the first piece
            return False
        for moved in moves:
            self.sent += moved
        return True

    def _emit_body(self, data: bytes) -> None:
        head, self._head = self._head, b""
        if not head:
            super()._emit_body(data)
        elif self.chunked:
            self.sock.sendall(b"%s%X\r\n%s\r\n" % (head, len(data), data))
        else:
            self.sock.sendall(head + data)


class _Spliceable(wsgi.FileWrapper):  # type: ignore[misc]
    """A response body with a ``splice_to``, marked for :meth:`Response.sendfile`.

    gunicorn hands a body to ``sendfile`` only when it is its
    ``wsgi.file_wrapper``; iterated, it is the body as the app returned it.
    """

    def __init__(
        self, body: Iterable[bytes], splice_to: Callable[[Any, int, bytes], Iterator[int]]
    ) -> None:
        self.body = body
        self.splice_to = splice_to

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


def _offering_splice(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """*app*, with bodies that can move socket to socket marked for the worker.

    A body offers it with a ``splice_to`` attribute (not None): a callable that
    takes the client's socket, the length the head announces and the head,
    raises ValueError at once if that length is not the body's, and otherwise
    returns an iterator that sends the head and moves the body there, yielding
    the body bytes of each move (:meth:`authproxy.transport.Response.splice_to`).
    """

    def serve(environ: Any, start_response: Any) -> Iterable[bytes]:
        body = app(environ, start_response)
        splice_to = getattr(body, "splice_to", None)
        return body if splice_to is None else _Spliceable(body, splice_to)

    return serve


_date: tuple[int, str] = (-1, "")


def _http_date() -> str:
    """``Wed, 25 Nov 2026 10:00:00 GMT``, made once a second."""
    global _date
    now = int(time.time())
    second, text = _date
    if second != now:
        text = formatdate(now, usegmt=True)
        _date = (now, text)
    return text


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


_malloc_trim = _find_malloc_trim()


def _body_read(message: Any) -> bool:
    """True if the request body was empty or read to its end: nothing to drain."""
    body: Any = getattr(message, "body", None)
    reader: Any = getattr(body, "reader", None)
    return (
        type(reader) is LengthReader
        and reader.length == 0
        and not body.failed
        and body.buf.tell() == 0
    )
