"""The gunicorn worker ``authproxy serve`` runs for ``worker_class = "gthread"``."""

from __future__ import annotations

import ctypes
import errno
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from typing import Any

from gunicorn.http import wsgi
from gunicorn.http.body import LengthReader
from gunicorn.workers.gthread import _DEFER, STOP_KEEPALIVE_LINGER, TConn
from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker

# A connection's socket in the worker's epoll: reported once, then disarmed
# until the thread that served it arms it again. Without epoll (macOS, the
# BSDs) the worker dispatches as gunicorn's does.
_EPOLL = hasattr(select, "epoll")
_ARMED = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLONESHOT", 0)


class ThreadWorker(_GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, with threads that take up requests themselves.

    gunicorn's gthread worker watches kept-alive connections in its main
    thread and hands each request to a pool thread, which hands the
    connection back when it has answered: three thread wake-ups and six
    system calls per request, each a chance for the GIL to change hands, and
    the main thread one more contender for it. Here the connections wait in
    an epoll that the pool threads wait on themselves, one event at a time
    (``EPOLLONESHOT``): the thread that is woken serves the request and arms
    the connection again. The main thread accepts connections, closes those
    idle past ``keepalive``, keeps the heartbeat and stops the worker.

    Without epoll (macOS, the BSDs) requests are dispatched as gunicorn does.

    Only :attr:`duty` threads wait for requests. Under a CPU-bound load every
    thread past those only adds contention for the GIL, and each request
    waits for its turn at it several times. A request that runs longer than
    :attr:`patience` seconds (a slow upstream, a long download, a WebSocket)
    hands its duty to a spare thread, so ``threads`` stays the number of
    requests a worker can have in flight at once.

    A response body that offers ``splice_to`` (a large upstream body with a
    declared length, from a plain-TCP upstream) goes from the upstream's socket
    to the client's inside the kernel (``splice(2)``), unless the client
    connection is TLS or gunicorn's ``sendfile`` setting is off.

    gunicorn's worker touches its heartbeat file (a ``utime`` system call) and
    asks whether its parent changed on every turn of its event loop. The
    arbiter only needs to hear from a worker within ``timeout`` seconds: this
    one touches the file at most every quarter of that and at least once a
    second, and looks for its parent once a second. With each heartbeat (glibc
    only) it also hands memory that its threads' malloc arenas hold free back
    to the system (``malloc_trim``): bodies passing through in pieces of
    varying size leave them full of free pages, several MiB per thread.
    """

    #: Threads waiting for the next request while the others serve theirs.
    duty = 2
    #: Seconds a request may run before a spare thread takes over its duty.
    patience = 0.005
    _last_notify = float("-inf")
    _last_parent_check = float("-inf")
    wsgi: Callable[..., Iterable[bytes]]

    def init_process(self) -> None:
        # gunicorn's wsgi.create() looks its response class up at call time.
        wsgi.Response = Response
        if not _EPOLL:
            super().init_process()
            return
        self._ready = select.epoll()
        self._open: dict[int, Any] = {}  # every connection, by file descriptor
        self._idle: dict[int, Any] = {}  # those waiting for their next request
        self._busy: dict[int, float] = {}  # thread -> when its request began, while on duty
        self._duty = threading.Semaphore(min(self.duty, self.cfg.threads))
        self._done = False
        self._dozing = False
        self._expired_at = 0.0
        self.keepalived_conns = self._idle  # counted by gunicorn's handle_request
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

    def is_parent_alive(self) -> bool:
        now = time.monotonic()
        if now - self._last_parent_check < 1.0:
            return True
        self._last_parent_check = now
        return bool(super().is_parent_alive())

    def run(self) -> None:
        if not _EPOLL:
            super().run()
            return
        for _ in range(self.cfg.threads):
            threading.Thread(target=self._serve, daemon=True).start()
        self.poller.register(self.method_queue.fileno(), 1, self.method_queue.run_callbacks)
        while self.alive:
            self.notify()
            accepting = len(self._open) < self.worker_connections
            if accepting != self._accepting:
                self.set_accept_enabled(accepting)
            self._tend(1.0)
            if not self.is_parent_alive():
                break
        # Stopping: no new connections; kept-alive ones get a short while, in
        # which a request is answered with "Connection: close" (RFC 9112 9.6).
        self.set_accept_enabled(False)
        now = time.monotonic()
        for conn in list(self._idle.values()):
            conn.timeout = min(conn.timeout, now + STOP_KEEPALIVE_LINGER)
        deadline = now + self.cfg.graceful_timeout
        while self._open and time.monotonic() < deadline:
            self.notify()
            self._tend(0.1)
        self._done = True
        for conn in list(self._open.values()):
            self._close(conn)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    def _tend(self, timeout: float) -> None:
        """One turn of the main thread: accept, relieve slow requests, expire idle connections."""
        self._dozing = True  # before looking: a request taken up after the look wakes it
        if self._busy:  # a request on duty may need relieving
            self._dozing = False
            timeout = self.patience
        self.wait_for_and_dispatch_events(timeout)
        self._dozing = False
        now = time.monotonic()
        for thread, since in list(self._busy.items()):
            # Whoever pops the entry, this thread or the serving one, frees the duty.
            if now - since >= self.patience and self._busy.pop(thread, None) is not None:
                self._duty.release()
        if now - self._expired_at < 1.0 and self.alive:
            return
        self._expired_at = now
        for fd, conn in list(self._idle.items()):
            if conn.timeout <= now and self._idle.pop(fd, None) is not None:
                self._close(conn)

    def accept(self, listener: Any) -> None:
        if not _EPOLL:
            super().accept(listener)
            return
        try:
            sock, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = TConn(self.cfg, sock, addr, listener.getsockname())
        conn.fd = sock.fileno()
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self._open[conn.fd] = conn
        self._idle[conn.fd] = conn
        self._ready.register(conn.fd, _ARMED)

    def _serve(self) -> None:
        """A pool thread: wait for a request while on duty, serve it, and again."""
        poll, idle, busy = self._ready.poll, self._idle, self._busy
        me = threading.get_ident()
        on_duty = False
        while not self._done:
            if not on_duty:
                on_duty = self._duty.acquire(timeout=1.0)
                continue
            for fd, _ in poll(1.0, 1):
                conn = idle.pop(fd, None)
                if conn is None:  # closed as it expired
                    continue
                busy[me] = time.monotonic()
                if self._dozing:  # the main thread sleeps long while no request is on duty
                    self._dozing = False
                    self.method_queue.defer(_nothing)
                try:
                    self._serve_connection(conn)
                except Exception:
                    self.log.exception("Error serving a connection")
                    self._close(conn)
                on_duty = busy.pop(me, None) is not None  # or a spare thread has the duty now

    def _serve_connection(self, conn: Any) -> None:
        keepalive = self.handle(conn)
        while keepalive is True and not conn.is_http2 and conn.parser.unreader.buf.getvalue():
            keepalive = self.handle(conn)  # read along with the last request: no event comes
        if keepalive is not True and keepalive is not _DEFER:
            self._close(conn, graceful=True)
            return
        now = time.monotonic()
        conn.timeout = now + (self.cfg.keepalive if self.alive else STOP_KEEPALIVE_LINGER)
        self._idle[conn.fd] = conn
        try:
            self._ready.modify(conn.fd, _ARMED)
        except OSError:  # expired and closed meanwhile
            pass

    def _close(self, conn: Any, graceful: bool = False) -> None:
        self._open.pop(conn.fd, None)
        try:
            self._ready.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.close(graceful=graceful)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # gunicorn drains what the application left of the request body under
        # a timeout, setting and restoring it (two system calls) even when the
        # body is empty or was read to its end, as for nearly every request.
        if keepalive and _body_read(conn.parser.mesg):
            return True
        return bool(super()._keepalive_after(conn, keepalive))


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


def _nothing() -> None:
    pass


def _offering_splice(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """*app*, with bodies that can move socket to socket marked for the worker.

    A body offers it with a ``splice_to`` attribute (not None): a callable that
    takes the client's socket, the length the head announces and the head,
    raises ValueError at once if that length is not the body's, and otherwise
    returns an iterator that sends the head and moves the body there, yielding
    the body bytes of each move (:meth:`authproxy.upstream.transport.Response.splice_to`).
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
