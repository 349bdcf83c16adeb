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
  flight, as with gunicorn's gthread worker.
- A streamed answer (SSE, a Kubernetes watch, a download of unknown length)
  and an accepted upgrade (WebSocket) go back to the loop, which relays their
  bytes while neither side can block it: a body offers that with a ``feed``
  (:class:`authproxy.context.Feed`), an upgrade with a ``tunnel``
  (:class:`authproxy.upstream.tunnel.TunnelBody`). The body's ``close()`` is
  called when the relay ends, so the access-log line carries the bytes, the
  duration and why it ended.

The loop alone registers, unregisters and closes client sockets: a
descriptor is unregistered before it is closed, and only once, so a number
the kernel reuses for a new connection can never be mistaken for an old one.

On SIGTERM the worker stops accepting, closes idle connections, lets
requests in flight finish and relays run for up to ``graceful_timeout``
seconds, then closes what is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import resource
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools
from gunicorn.sock import ssl_wrap_socket
from gunicorn.workers import base

from ..upstream.client import client_gone
from ..upstream.relay import Flow
from .exchange import Keep, Outcome, Stream, Tunnel, serve_request

#: Body bytes the loop reads before a thread takes the request: a body up to
#: this size arrives in full before any thread waits on it.
BODY_BUFFER = 64 * 1024
#: A streamed body's bytes held for a slow client before the upstream is paused.
STREAM_BUFFER = 256 * 1024
#: How often deadlines are looked at, in seconds.
TICK = 0.25
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
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
        self.selector = selectors.DefaultSelector()
        self.jobs: queue.SimpleQueue[Client | None] = queue.SimpleQueue()
        self.done: deque[Callable[[], None]] = deque()
        self.clients: set[Client] = set()  # reading a request, or idle
        self.relays: set[Any] = set()  # StreamRelay, TunnelRelay
        self.busy = 0  # requests with a thread
        self.open = 0  # every client connection
        self.accepting = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sleeping = False
        self._next_expiry = 0.0
        self.tls = bool(worker.cfg.is_ssl)

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        worker = self.worker
        for listener in worker.sockets:
            listener.setblocking(False)
        self.selector.register(self._wake_r, _READ, self._on_wake)
        self._accept_enabled(True)
        threads = [
            threading.Thread(target=self._serve, daemon=True, name=f"authproxy-{n}")
            for n in range(worker.cfg.threads)
        ]
        for thread in threads:
            thread.start()
        ppid_checked = 0.0
        while worker.alive:
            self._turn()
            now = time.monotonic()
            if now - ppid_checked >= 1.0:
                ppid_checked = now
                worker.notify()
                if os.getppid() != worker.ppid:
                    worker.log.info("Parent changed, shutting down: %s", worker)
                    break
        self._stop(threads)

    def _turn(self) -> None:
        """Wait for events at most one tick, handle them, then the deadlines."""
        self._sleeping = True
        if self.done:
            timeout = 0.0
        else:
            timeout = TICK
        events = self.selector.select(timeout)
        self._sleeping = False
        for key, mask in events:
            key.data(mask)
        while self.done:
            self.done.popleft()()
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + TICK
            self._expire(now)

    def _stop(self, threads: list[threading.Thread]) -> None:
        worker = self.worker
        self._accept_enabled(False)
        for listener in worker.sockets:
            with contextlib.suppress(OSError):
                listener.close()
        for client in list(self.clients):
            client.close()
        deadline = time.monotonic() + worker.cfg.graceful_timeout
        while (self.busy or self.relays) and time.monotonic() < deadline:
            worker.notify()
            self._turn()
            for client in list(self.clients):  # answered while stopping: not kept
                client.close()
        for relay in list(self.relays):
            relay.end("shutdown")
        for _ in threads:
            self.jobs.put(None)
        self.selector.close()

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run *callback* in the loop's thread (from any thread)."""
        self.done.append(callback)
        if self._sleeping:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    # -- connections -----------------------------------------------------------

    def _accept_enabled(self, enabled: bool) -> None:
        if enabled == self.accepting:
            return
        self.accepting = enabled
        for listener in self.worker.sockets:
            if enabled:
                self.selector.register(listener, _READ, self._acceptor(listener))
            else:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.selector.unregister(listener)

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
                except OSError as exc:  # out of descriptors: try again later
                    self.worker.log.warning("accept failed: %s", exc)
                    return
                self.open += 1
                client = Client(self, sock, addr, server)
                if self.tls:
                    client.dispatch()  # the handshake blocks: a thread does it
                else:
                    client.wait(time.monotonic() + self.worker.header_timeout)

        return accept

    def closed(self) -> None:
        """A client connection is gone (called once per connection)."""
        self.open -= 1
        if not self.accepting and self.worker.alive:
            self._accept_enabled(True)

    def _expire(self, now: float) -> None:
        for client in [c for c in self.clients if c.deadline <= now]:
            client.expire()
        for relay in [r for r in self.relays if r.deadline is not None and r.deadline <= now]:
            relay.expire(now)

    # -- the pool threads --------------------------------------------------------

    def _serve(self) -> None:
        worker = self.worker
        while True:
            client = self.jobs.get()
            if client is None:
                return
            outcome: Outcome = None
            try:
                outcome = client.serve()
            except Exception:
                worker.log.exception("Error serving a connection")
            worker.nr += 1
            if worker.nr >= worker.max_requests and worker.alive:
                worker.log.info("Autorestarting worker after current request.")
                worker.alive = False
            self.call_soon(lambda c=client, o=outcome: c.served(o))  # type: ignore[misc]


class Client:
    """A client connection while the loop holds it: reading a request, or idle."""

    __slots__ = (
        "loop",
        "sock",
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
        "wrapped",
    )

    def __init__(self, loop: Loop, sock: socket.socket, addr: Any, server: Any) -> None:
        self.loop = loop
        self.sock = sock
        self.addr = addr
        self.server = server
        self.buf = bytearray()
        self.parser: Any = None
        self.deadline = 0.0
        self.started = False
        self.wrapped = False
        self._new_request()
        sock.setblocking(False)

    def _new_request(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.head_done = False
        self.body_bytes = 0
        self.ready = False
        self.large = False

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
            if not value.strip().isdigit() or int(value) > BODY_BUFFER:
                self.large = True

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes >= BODY_BUFFER:
            self.ready = True

    def on_message_complete(self) -> None:
        self.ready = True

    # -- in the loop -------------------------------------------------------------

    def wait(self, deadline: float) -> None:
        """Wait in the loop for (the rest of) a request."""
        self.deadline = deadline
        self.loop.clients.add(self)
        self.loop.selector.register(self.sock, _READ, self.on_readable)
        if self.buf:
            self._feed(bytes(self.buf), fresh=True)
        elif self.wrapped and self.sock.pending():  # type: ignore[attr-defined]
            self.on_readable(_READ)

    def on_readable(self, mask: int) -> None:
        for _ in range(4):
            try:
                data = self.sock.recv(65536)
            except _WOULD_BLOCK:
                return
            except OSError:
                self.close()
                return
            if not data:
                if self.buf:  # the client stopped mid-request: a thread answers (400)
                    self.ready = True
                    self._feed(b"")
                else:
                    self.close()
                return
            if not self.started:
                self.started = True
                self.deadline = time.monotonic() + self.loop.worker.header_timeout
            elif self.head_done:
                self.deadline = time.monotonic() + self.loop.worker.body_timeout
            self.buf += data
            if self._feed(data):
                return

    def _feed(self, data: bytes, fresh: bool = False) -> bool:
        """Parse *data*; hand the request to a thread once it is ready. True if handed."""
        if fresh:
            self.started = True
            self.deadline = min(self.deadline, time.monotonic() + self.loop.worker.header_timeout)
        try:
            if data:
                self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.ready = True
        except httptools.HttpParserError:
            self.ready = True  # gunicorn's parser says what is wrong
        if self.ready or len(self.buf) > _max_head(self.loop.worker.cfg):
            self.loop.selector.unregister(self.sock)
            self.loop.clients.discard(self)
            self.dispatch()
            return True
        return False

    def expire(self) -> None:
        """Its deadline passed: idle too long, or a head or body too slow."""
        if self.started:
            with contextlib.suppress(OSError):
                self.sock.send(_TIMEOUT_408)
        self.close()

    def dispatch(self) -> None:
        self.loop.busy += 1
        self.loop.jobs.put(self)

    def close(self) -> None:
        loop = self.loop
        if self in loop.clients:
            loop.clients.discard(self)
            loop.selector.unregister(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()
        loop.closed()

    # -- in a pool thread ----------------------------------------------------------

    def serve(self) -> Outcome:
        worker = self.loop.worker
        if self.loop.tls and not self.wrapped:
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
        return serve_request(worker, self.sock, self.addr, self.server, buffered)

    # -- back in the loop --------------------------------------------------------

    def served(self, outcome: Outcome) -> None:
        loop = self.loop
        loop.busy -= 1
        if outcome is None:
            self.close()
        elif isinstance(outcome, Keep):
            if not loop.worker.alive:
                self.close()
                return
            self.sock.setblocking(False)
            self.buf[:] = outcome.buffered
            self.started = False
            self._new_request()
            self.wait(time.monotonic() + loop.worker.cfg.keepalive)
        elif isinstance(outcome, Stream):
            StreamRelay(self, outcome)
        elif isinstance(outcome, Tunnel):
            TunnelRelay(self, outcome)


class StreamRelay:
    """Relays a streamed body from the upstream to the client, in the loop."""

    def __init__(self, client: Client, out: Stream) -> None:
        self.client = client
        self.loop = client.loop
        self.out = out
        self.feed = out.feed
        self.sock = client.sock
        self.pending = bytearray()
        self.ended = False
        self.watching_client = True
        self.upstream_paused = False
        self.timeout = self.feed.read_timeout
        self.deadline = None if not self.timeout else time.monotonic() + self.timeout
        self.sock.setblocking(False)
        self.loop.relays.add(self)
        self.upstream_fd = self.feed.fileno()
        self.loop.selector.register(self.upstream_fd, _READ, self._on_upstream)
        self.loop.selector.register(self.sock, _READ, self._on_client)
        self._pump()

    def _on_upstream(self, mask: int) -> None:
        self._pump()

    def _pump(self) -> None:
        chunked = self.out.chunked
        while len(self.pending) < STREAM_BUFFER:
            try:
                data = self.feed.read_nowait()
            except Exception as exc:
                self.loop.worker.log.warning("upstream failed mid-body: %s", exc)
                self.end("upstream", abort=True)
                return
            if data is None:
                self.ended = True
                if chunked:
                    self.pending += b"0\r\n\r\n"
                break
            if not data:
                break
            if self.timeout:
                self.deadline = time.monotonic() + self.timeout
            if chunked:
                self.pending += b"%X\r\n" % len(data)
                self.pending += data
                self.pending += b"\r\n"
            else:
                self.pending += data
        self._flush()

    def _flush(self) -> None:
        if self.pending:
            try:
                sent = self.sock.send(self.pending)
            except _WOULD_BLOCK:
                sent = 0
            except OSError:
                self.end("ClientGone", abort=True)
                return
            del self.pending[:sent]
        if self.pending:
            self._want_upstream(False)
            self._want_client(_WRITE | (_READ if self.watching_client else 0))
        elif self.ended:
            self.end(None)
        else:
            self._want_upstream(True)
            self._want_client(_READ if self.watching_client else 0)

    def _on_client(self, mask: int) -> None:
        if mask & _READ and self.watching_client:
            gone = client_gone(self.sock)
            if gone or gone is None:
                self.end("ClientGone", abort=True)
                return
            self.watching_client = False  # it sent its next request: read it later
        if mask & _WRITE:
            self._flush()
            if self.pending or self.ended:
                return
            self._pump()
        else:
            self._want_client(_WRITE if self.pending else 0)

    def _want_upstream(self, wanted: bool) -> None:
        if wanted == (not self.upstream_paused):
            return
        self.upstream_paused = not wanted
        if wanted:
            self.loop.selector.register(self.upstream_fd, _READ, self._on_upstream)
        else:
            self.loop.selector.unregister(self.upstream_fd)

    def _want_client(self, events: int) -> None:
        selector = self.loop.selector
        try:
            key = selector.get_key(self.sock)
        except KeyError:
            key = None
        if key is None:
            if events:
                selector.register(self.sock, events, self._on_client)
        elif not events:
            selector.unregister(self.sock)
        elif key.events != events:
            selector.modify(self.sock, events, self._on_client)

    def expire(self, now: float) -> None:
        self.loop.worker.log.warning("upstream stalled mid-body for %s s", self.timeout)
        self.end("UpstreamTimeout", abort=True)

    def end(self, why: str | None, abort: bool = False) -> None:
        """The body is done (*why* None) or abandoned; the client connection is kept or closed."""
        loop = self.loop
        if self not in loop.relays:
            return
        loop.relays.discard(self)
        if not self.upstream_paused:
            loop.selector.unregister(self.upstream_fd)
        self._want_client(0)
        if abort and why is not None:
            record = getattr(self.feed, "abort", None)
            if record is not None and why in ("ClientGone", "UpstreamTimeout", "shutdown"):
                record(why)
        try:
            self.out.body.close()
        except Exception:
            loop.worker.log.exception("Error closing a response body")
        client = self.client
        if abort or not self.out.keep or not loop.worker.alive:
            client.close()
            return
        self.sock.setblocking(False)
        client.buf[:] = self.out.buffered
        client.started = False
        client._new_request()
        client.wait(time.monotonic() + loop.worker.cfg.keepalive)


class TunnelRelay:
    """Relays an accepted upgrade's bytes both ways, in the loop."""

    def __init__(self, client: Client, out: Tunnel) -> None:
        self.client = client
        self.loop = client.loop
        self.out = out
        tunnel = out.tunnel
        self.sock = client.sock
        self.upstream = tunnel.upstream
        self.flows = (
            Flow(self.sock, self.upstream, out.to_upstream, tunnel.chunk_size),
            Flow(self.upstream, self.sock, tunnel.to_client, tunnel.chunk_size),
        )
        self.idle_timeout = tunnel.idle_timeout or None
        self.end_of_life = tunnel.deadline
        self.last = time.monotonic()
        self.deadline = self._next_deadline()
        self.registered: dict[Any, int] = {}
        self.sock.setblocking(False)
        self.upstream.setblocking(False)
        self.loop.relays.add(self)
        self._step(0)

    def _next_deadline(self) -> float | None:
        deadlines = [d for d in (self.end_of_life,) if d is not None]
        if self.idle_timeout:
            deadlines.append(self.last + self.idle_timeout)
        return min(deadlines) if deadlines else None

    def _step(self, mask: int) -> None:
        try:
            for _ in range(8):
                moved = False
                for flow in self.flows:
                    if not flow.done:
                        moved = flow.step() or moved
                if moved:
                    self.last = time.monotonic()
                if all(f.done for f in self.flows):
                    self.end("closed")
                    return
                if all(f.done or f.wait is not None for f in self.flows):
                    break
            else:
                self.loop.call_soon(lambda: self._step(0))  # fair to the others
        except ConnectionError:
            self.end("reset")
            return
        except OSError:
            self.end("error")
            return
        self.deadline = self._next_deadline()
        wanted: dict[Any, int] = {}
        for flow in self.flows:
            if not flow.done and flow.wait is not None:
                sock, event = flow.wait
                wanted[sock] = wanted.get(sock, 0) | event
        selector = self.loop.selector
        for sock in [s for s in self.registered if s not in wanted]:
            selector.unregister(sock)
            del self.registered[sock]
        for sock, events in wanted.items():
            if sock not in self.registered:
                selector.register(sock, events, self._step)
            elif self.registered[sock] != events:
                selector.modify(sock, events, self._step)
            self.registered[sock] = events

    def expire(self, now: float) -> None:
        if self.end_of_life is not None and now >= self.end_of_life:
            self.end("lifetime")
        else:
            self.end("idle")

    def end(self, why: str) -> None:
        loop = self.loop
        if self not in loop.relays:
            return
        loop.relays.discard(self)
        for sock in self.registered:
            loop.selector.unregister(sock)
        self.registered.clear()
        tunnel = self.out.tunnel
        try:
            tunnel.finish(self.flows[0].moved, self.flows[1].moved, why)
            self.out.body.close()
        except Exception:
            loop.worker.log.exception("Error closing a tunnel")
        self.client.close()


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
