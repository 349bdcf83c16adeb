"""authproxy's gunicorn worker: an event loop for connections, threads for requests.

``worker_class = "authproxy"`` (the default) runs :class:`Worker`, a worker on
gunicorn's worker interface (:class:`gunicorn.workers.base.Worker`, as
uvicorn's is) with a loop of its own. What costs only a socket stays in the
loop; a thread is taken only while a request is being answered:

- The loop accepts connections and reads request heads (and bodies up to
  :data:`BODY_BUFFER`) without blocking, so a client that trickles its head
  or body holds a socket, not a thread. A head must arrive within
  ``header_timeout`` seconds, a body may stall at most ``body_timeout``
  seconds; past either the client gets ``408`` and the connection closes.
  Kept-alive connections wait here between requests, for ``keepalive``
  seconds.
- A complete request goes to one of ``threads`` pool threads, which parses it
  with gunicorn's parser, runs the pipeline and writes the answer
  (:mod:`authproxy.serve.exchange`). ``threads`` is the number of requests in
  flight, as with gunicorn's gthread worker. The thread then arms the idle
  connection for its next request itself (:mod:`authproxy.serve.poller`).
- A streamed answer (SSE, a Kubernetes watch, a download of unknown length)
  and an accepted upgrade (WebSocket) go back to the loop, which relays their
  bytes (:mod:`authproxy.serve.relays`): a body offers that with a ``feed``
  (:class:`authproxy.context.Feed`), an upgrade with a ``tunnel``
  (:class:`authproxy.upstream.tunnel.TunnelBody`). The body's ``close()`` is
  called when the relay ends, so the access-log line carries the bytes, the
  duration and why it ended.

The loop alone closes client sockets, and a descriptor leaves the poller
before it is closed, once: a number the kernel reuses for a new connection
can never be mistaken for an old one.

On SIGTERM the worker stops accepting, closes idle connections, lets
requests in flight finish and relays run for up to ``graceful_timeout``
seconds, then closes what is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools
from gunicorn.sock import ssl_wrap_socket
from gunicorn.workers import base

from .exchange import Keep, Outcome, Stream, Tunnel, serve_request
from .poller import READ, EpollReady, QueueReady, make_poller
from .relays import StreamRelay, TunnelRelay

#: Body bytes the loop reads before a thread takes the request: a body up to
#: this size arrives in full before any thread waits on it.
BODY_BUFFER = 64 * 1024
#: Seconds before gunicorn's graceful_timeout at which a stopping worker ends
#: what is still open.
GRACE_MARGIN = 0.5
#: How often deadlines are looked at, in seconds.
TICK = 0.25
#: Pool threads waiting for the next request while the others serve theirs:
#: under a CPU-bound load every thread past these only adds contention for
#: the GIL, and each request waits for its turn at it several times.
DUTY = 2
#: Seconds a request may run before a spare thread takes over its duty, so a
#: slow upstream, a long download or a stream being set up never keeps the
#: others waiting: ``threads`` stays the number of requests in flight.
PATIENCE = 0.005
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\r\nRequest Timeout\n"
)


class Worker(base.Worker):  # type: ignore[misc]
    """gunicorn worker with an event loop for connections; see the module docstring."""

    #: Seconds a request head may take to arrive in full ([server] header_timeout).
    header_timeout = 10.0
    #: Seconds a request body may stall ([server] body_timeout).
    body_timeout = 60.0

    def init_process(self) -> None:
        _raise_open_files_limit()
        super().init_process()

    def run(self) -> None:
        Loop(self).run()

    def notify(self) -> None:
        super().notify()
        if _malloc_trim is not None:
            _malloc_trim(0)


class Loop:
    """The worker's event loop: sockets, deadlines and the pool threads."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.done: deque[Callable[[], None]] = deque()
        self.poller = make_poller(self.call_soon)
        self.ready: Any = (
            EpollReady() if hasattr(select, "epoll") else QueueReady(self._wait_in_loop)
        )
        self.duty = threading.Semaphore(max(1, min(DUTY, worker.cfg.threads)))
        self.busy: dict[int, float] = {}  # pool thread -> when its request began, while on duty
        self.stopping = False
        self.clients: set[Client] = set()  # the loop reads (the rest of) their request
        self.serving: set[Client] = set()  # with a pool thread
        self.relays: set[Any] = set()  # StreamRelay, TunnelRelay
        self.open = 0  # client connections (changed by the loop thread only)
        self.accepting = False
        self.tls = bool(worker.cfg.is_ssl)
        self.max_head = _max_head(worker.cfg)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sleeping = False
        self._dozing = False
        self._next_expiry = 0.0
        seconds = int(worker.body_timeout)
        #: SO_RCVTIMEO / SO_SNDTIMEO for client sockets: a thread's reads and
        #: writes wait at most body_timeout, with no poll() before each.
        self.kernel_timeout = struct.pack(
            "@ll", seconds, int((worker.body_timeout - seconds) * 1e6)
        )

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        worker = self.worker
        for listener in worker.sockets:
            listener.setblocking(False)
        self.poller.watch(self._wake_r, READ, self._on_wake)
        # gunicorn's signal wake-up pipe: SIGTERM ends the poll at once, so the
        # worker stops accepting now, not at the end of its tick.
        self.poller.watch(worker.PIPE[0], READ, self._on_signal)
        self._accept_enabled(True)
        threads = [
            threading.Thread(target=self._serve, daemon=True, name=f"authproxy-{n}")
            for n in range(worker.cfg.threads)
        ]
        for thread in threads:
            thread.start()
        parent_checked = 0.0
        while worker.alive:
            self._turn()
            now = time.monotonic()
            if now - parent_checked >= 1.0:
                parent_checked = now
                worker.notify()
                if os.getppid() != worker.ppid:
                    worker.log.info("Parent changed, shutting down: %s", worker)
                    break
        self._stop(threads)

    def _turn(self) -> None:
        """Wait for events at most one tick, handle them, then the deadlines."""
        # While a request is on duty the loop looks every PATIENCE seconds, to
        # hand a slow request's duty to a spare thread; otherwise it dozes, and
        # the first request taken up wakes it.
        self._dozing = not self.busy  # before looking: a request taken up after it wakes us
        self._sleeping = True
        events = self.poller.poll(0.0 if self.done else TICK if self._dozing else PATIENCE)
        self._sleeping = self._dozing = False
        for handler, mask in events:
            handler(mask)
        while self.done:
            self.done.popleft()()
        now = time.monotonic()
        for thread, since in list(self.busy.items()):
            # Whoever pops the entry, the loop or the serving thread, frees the duty.
            if now - since >= PATIENCE and self.busy.pop(thread, None) is not None:
                self.duty.release()
        if now >= self._next_expiry:
            self._next_expiry = now + TICK
            for client in [c for c in list(self.clients) if c.deadline <= now]:
                client.expire()
            for client in self.ready.idle():
                if client.deadline <= now and self.ready.disarm(client):
                    client.close()
            for relay in [r for r in list(self.relays) if r.deadline and r.deadline <= now]:
                relay.expire(now)

    def _stop(self, threads: list[threading.Thread]) -> None:
        worker = self.worker
        self._accept_enabled(False)
        for listener in worker.sockets:
            with contextlib.suppress(OSError):
                listener.close()
        self._close_waiting()
        # Done before the arbiter's own graceful_timeout runs out and it kills
        # the worker: the last access lines still need writing.
        deadline = time.monotonic() + max(0.0, worker.cfg.graceful_timeout - GRACE_MARGIN)
        while (self.serving or self.relays) and time.monotonic() < deadline:
            worker.notify()
            self._turn()
            self._close_waiting()  # answered while stopping: not kept
        for relay in list(self.relays):
            relay.end("shutdown")
        # Their access lines are written now, not when the worker exits: the
        # arbiter kills a worker that is still here at graceful_timeout.
        for handler in logging.getLogger("authproxy.access").handlers:
            handler.flush()
        self.stopping = True
        for _ in threads:
            self.ready.put(None)
        self.poller.close()

    def _close_waiting(self) -> None:
        for client in list(self.clients):
            client.close()
        for client in self.ready.idle():
            if self.ready.disarm(client):
                client.close()

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run *callback* in the loop's thread (from any thread)."""
        self.done.append(callback)
        if self._sleeping:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    def _on_signal(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.worker.PIPE[0], 4096)

    # -- connections -----------------------------------------------------------

    def _accept_enabled(self, enabled: bool) -> None:
        if enabled == self.accepting:
            return
        self.accepting = enabled
        for listener in self.worker.sockets:
            if enabled:
                self.poller.watch(listener.fileno(), READ, self._acceptor(listener))
            else:
                self.poller.forget(listener.fileno())

    def _acceptor(self, listener: socket.socket) -> Callable[[int], None]:
        server = listener.getsockname()

        def accept(mask: int) -> None:
            limit = self.worker.cfg.worker_connections
            for _ in range(64):
                if self.open >= limit:
                    self._accept_enabled(False)
                    return
                try:
                    sock, addr = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    return
                except OSError as exc:  # out of descriptors: try again on the next event
                    self.worker.log.warning("accept failed: %s", exc)
                    return
                self.open += 1
                client = Client(self, sock, addr, server)
                client.deadline = time.monotonic() + self.worker.header_timeout
                if self.tls:
                    client.dispatch()  # the handshake blocks: a thread does it
                else:
                    self.ready.arm(client)  # most first requests come in one piece

        return accept

    def closed(self) -> None:
        """A client connection is gone (called once per connection, in the loop)."""
        self.open -= 1
        if not self.accepting and self.worker.alive:
            self._accept_enabled(True)

    # -- the pool threads --------------------------------------------------------

    def _wait_in_loop(self, client: Client) -> None:
        self.call_soon(lambda: client.wait(client.deadline))

    def _serve(self) -> None:
        """A pool thread: wait for work while on duty, serve it, and again."""
        worker, ready, busy = self.worker, self.ready, self.busy
        me = threading.get_ident()
        on_duty = False
        while True:
            if not on_duty:
                if self.stopping:
                    return
                on_duty = self.duty.acquire(timeout=1.0)
                continue
            client, fresh = ready.take()
            if client is None:
                return
            busy[me] = time.monotonic()
            if self._dozing:
                self._dozing = False
                self.call_soon(_nothing)
            outcome: Any = None
            try:
                outcome = client.read_and_serve() if fresh else client.serve()
            except Exception:
                worker.log.exception("Error serving a connection")
            if outcome is not _HANDED:
                worker.nr += 1
                if worker.nr >= worker.max_requests and worker.alive:
                    worker.log.info("Autorestarting worker after current request.")
                    worker.alive = False
                client.served(outcome)
            on_duty = busy.pop(me, None) is not None  # or a spare thread has the duty now


def _nothing() -> None:
    pass


#: What a pool thread returns when it gave the connection to the loop to read more.
_HANDED = object()


class Client:
    """A client connection: its socket, and what the loop read of its next request."""

    __slots__ = (
        "loop",
        "sock",
        "fd",
        "addr",
        "server",
        "buf",
        "parser",
        "deadline",
        "started",
        "head_done",
        "body_bytes",
        "ready",
        "large",
        "has_body",
        "complete",
        "wrapped",
        "closed",
    )

    def __init__(self, loop: Loop, sock: socket.socket, addr: Any, server: Any) -> None:
        self.loop = loop
        self.sock: Any = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.server = server
        self.buf = bytearray()
        self.parser: Any = None
        self.deadline = 0.0
        self.wrapped = False
        self.closed = False
        self._new_request()
        # A response's later writes (a stream's pieces) go out at once, not
        # held back until the client acknowledges the last one.
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not loop.tls:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, loop.kernel_timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, loop.kernel_timeout)

    def _new_request(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.started = False
        self.head_done = False
        self.body_bytes = 0
        self.ready = False
        self.large = False
        self.has_body = False
        self.complete = False

    # httptools callbacks: only what decides when a thread is needed.
    def on_headers_complete(self) -> None:
        self.head_done = True
        self.deadline = time.monotonic() + self.loop.worker.body_timeout
        if self.large or self.parser.should_upgrade():
            self.ready = True

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect":
            self.large = True  # the client waits for "100 Continue" before its body
        elif name == b"content-length":
            if value.strip() != b"0":
                self.has_body = True  # never unset by a later pipelined request
            if not value.strip().isdigit() or int(value) > BODY_BUFFER:
                self.large = True
        elif name == b"transfer-encoding":
            self.has_body = True

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes >= BODY_BUFFER:
            self.ready = True

    def on_message_complete(self) -> None:
        self.complete = True
        self.ready = True

    # -- in the loop -------------------------------------------------------------

    def wait(self, deadline: float) -> None:
        """Wait in the loop for (the rest of) a request: the loop thread only."""
        self.deadline = deadline
        if self.buf:  # read along with the last request
            data = bytes(self.buf)
            self.buf.clear()
            if self._parse(data):
                self.dispatch()
                return
        self.loop.clients.add(self)
        self.loop.poller.arm(self.fd, self.on_readable)

    def on_readable(self, mask: int) -> None:
        if self.closed:
            return
        for _ in range(4):
            try:
                if self.wrapped:
                    data = self.sock.recv(65536)
                else:
                    data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except _WOULD_BLOCK:
                self.loop.poller.arm(self.fd, self.on_readable)
                return
            except OSError:
                self.close()
                return
            if not data:
                if self.buf:  # the client stopped mid-request: a thread answers (400)
                    self.loop.clients.discard(self)
                    self.dispatch()
                else:
                    self.close()
                return
            if self._parse(data):
                self.loop.clients.discard(self)
                self.dispatch()
                return
        self.loop.poller.arm(self.fd, self.on_readable)

    def _parse(self, data: bytes) -> bool:
        """Take *data* of the request; True once a thread is to have it."""
        worker = self.loop.worker
        if not self.started:
            self.started = True
            self.deadline = time.monotonic() + worker.header_timeout
        elif self.head_done:
            self.deadline = time.monotonic() + worker.body_timeout
        self.buf += data
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError):
            self.ready = True  # an upgrade, or gunicorn's parser says what is wrong
        return self.ready or len(self.buf) > self.loop.max_head

    def expire(self) -> None:
        """Its deadline passed: idle too long, or a head or body too slow."""
        if self.started and not self.wrapped:
            with contextlib.suppress(OSError):
                self.sock.send(_TIMEOUT_408, socket.MSG_DONTWAIT)
        self.close()

    def dispatch(self) -> None:
        self.loop.serving.add(self)
        self.loop.ready.put(self)

    def close(self) -> None:
        """Close the connection: the loop thread only, once."""
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        loop.clients.discard(self)
        loop.poller.forget(self.fd)
        with contextlib.suppress(OSError):
            self.sock.close()
        loop.closed()

    # -- in a pool thread ----------------------------------------------------------

    def read_and_serve(self) -> Any:
        """An idle connection turned readable: serve its request if it came whole,
        else give the connection to the loop to read the rest."""
        loop = self.loop
        loop.serving.add(self)
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except _WOULD_BLOCK:
            data = None
        except OSError:
            data = b""
        if data and self._parse(data):
            return self.serve()
        if data == b"":
            loop.call_soon(self._hang_up)
        else:  # a part of the request, or nothing after all: the loop reads on
            loop.call_soon(lambda: self._read_on(bool(data)))
        return _HANDED

    def _hang_up(self) -> None:
        self.loop.serving.discard(self)
        if self.buf:  # mid-request: a thread answers (400)
            self.dispatch()
        else:
            self.close()

    def _read_on(self, started: bool) -> None:
        loop = self.loop
        loop.serving.discard(self)
        if started:  # what came is parsed already: wait for more
            loop.clients.add(self)
            loop.poller.arm(self.fd, self.on_readable)
        else:
            loop.ready.arm(self)

    def serve(self) -> Outcome:
        worker = self.loop.worker
        if self.loop.tls:
            if not self.wrapped:
                self.sock.settimeout(worker.header_timeout)
                try:
                    self.sock = ssl_wrap_socket(self.sock, worker.cfg)
                except (OSError, ValueError) as exc:
                    worker.log.debug("TLS handshake failed: %s", exc)
                    return None
                self.wrapped = True
            self.sock.settimeout(worker.body_timeout)
        buffered = bytes(self.buf)
        self.buf.clear()
        # Skip the drain only for a request the loop's parser read to its end and
        # saw no body in. A request that parser refused (gunicorn may still take
        # it, with a body) is drained: an unread body must never become the
        # start of the next request on the connection.
        drain = self.has_body or not self.complete or self.wrapped
        return serve_request(worker, self.sock, self.addr, self.server, buffered, drain=drain)

    def served(self, outcome: Outcome) -> None:
        """In the pool thread that served the request: what becomes of the connection."""
        loop = self.loop
        if (
            isinstance(outcome, Keep)
            and loop.worker.alive
            and not outcome.buffered
            and not self.wrapped
        ):
            # The common case needs nothing of the loop: arm the idle connection here.
            self._new_request()
            self.deadline = time.monotonic() + loop.worker.cfg.keepalive
            loop.serving.discard(self)
            loop.ready.arm(self)
            return
        loop.call_soon(lambda: self._after(outcome))

    def _after(self, outcome: Outcome) -> None:
        """Back in the loop: close, wait for the next request, or relay."""
        loop = self.loop
        loop.serving.discard(self)
        if outcome is None or not loop.worker.alive and isinstance(outcome, Keep):
            self.close()
        elif isinstance(outcome, Keep):
            self.keep(outcome.buffered)
        elif isinstance(outcome, Stream):
            StreamRelay(self, outcome)
        elif isinstance(outcome, Tunnel):
            TunnelRelay(self, outcome)

    def keep(self, buffered: bytes) -> None:
        """Wait for the next request, with *buffered* bytes of it already read."""
        if self.wrapped:
            self.sock.setblocking(False)
        else:
            self.sock.setblocking(True)
        self.buf[:] = buffered
        self._new_request()
        self.deadline = time.monotonic() + self.loop.worker.cfg.keepalive
        if buffered or self.wrapped:
            self.wait(self.deadline)
        else:
            self.loop.ready.arm(self)


def _max_head(cfg: Any) -> int:
    """Bytes past which an unfinished head goes to gunicorn's parser to be refused."""
    line = cfg.limit_request_line or 8190
    fields = cfg.limit_request_fields or 32768
    size = cfg.limit_request_field_size or 8190
    return line + fields * (size + 2) + 4


def _raise_open_files_limit() -> None:
    """Let the worker hold as many sockets as the hard limit allows (each
    tunnel is two descriptors); the soft limit is often 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


_malloc_trim = _find_malloc_trim()
