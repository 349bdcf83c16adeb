"""What the worker's event loop relays without a thread: streamed bodies and tunnels.

A :class:`StreamRelay` reads an upstream body through its ``feed``
(:class:`authproxy.context.Feed`) whenever the upstream socket is readable,
frames it for the client (chunked, or as it is under a declared length) and
writes it as the client takes it: at most :data:`STREAM_BUFFER` bytes wait
for a slow client before the upstream is no longer read. A client that hangs
up ends it at once. A :class:`TunnelRelay` copies an accepted upgrade's bytes
both ways (:class:`authproxy.upstream.relay.Flow`, one chunk in hand per
direction) until both sides have closed, it idles past its limit, or its
deadline (lifetime, or the expiry of the token that opened it) comes.

Both run in the loop thread only, and end by closing the response body, so
the access log writes the line of a stream or tunnel when it ends.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..context import close_body
from ..upstream.client import client_gone
from ..upstream.relay import Flow
from .exchange import Stream, Tunnel
from .poller import READ, WRITE

if TYPE_CHECKING:
    from .worker import Client

#: A streamed body's bytes held for a slow client before the upstream is paused.
STREAM_BUFFER = 256 * 1024
_WOULD_BLOCK = (BlockingIOError, InterruptedError)


class StreamRelay:
    """Relays a streamed body from the upstream to the client."""

    def __init__(self, client: Client, out: Stream) -> None:
        self.client = client
        self.loop = client.loop
        self.out = out
        self.feed = out.feed
        self.sock = client.sock
        self.pending = bytearray()
        self.ended = False
        self.watching_client = True  # for a hang-up, until the client sends more
        self.timeout = self.feed.read_timeout
        self.deadline = time.monotonic() + self.timeout if self.timeout else None
        self.upstream_fd = self.feed.fileno()
        self.upstream_watched = False
        self.client_events = -1
        self.over = False
        self.loop.relays.add(self)
        self.sock.setblocking(False)
        self._pump()

    def _pump(self, mask: int = READ) -> None:
        chunked = self.out.chunked
        while len(self.pending) < STREAM_BUFFER:
            try:
                data = self.feed.read_nowait()
            except Exception as exc:  # an upstream error: the client connection is aborted
                self.loop.worker.log.warning("upstream failed mid-body: %s", exc)
                self.end(None, abort=True)
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
                self.pending += b"%X\r\n%b\r\n" % (len(data), data)
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
            self._watch_upstream(False)
            self._watch_client(WRITE | (READ if self.watching_client else 0))
        elif self.ended:
            self.end(None)
        else:
            self._watch_upstream(True)
            self._watch_client(READ if self.watching_client else 0)

    def _on_client(self, mask: int) -> None:
        if mask & READ and self.watching_client:
            gone = client_gone(self.sock)
            if gone or gone is None:
                self.end("ClientGone", abort=True)
                return
            self.watching_client = False  # it sent its next request: read that later
        if mask & WRITE:
            self._flush()
            if self.pending or self.ended or self.over:
                return
            self._pump()
        else:
            self._watch_client(WRITE if self.pending else 0)

    def _watch_upstream(self, wanted: bool) -> None:
        if wanted == self.upstream_watched:
            return
        self.upstream_watched = wanted
        if wanted:
            self.loop.poller.watch(self.upstream_fd, READ, self._pump)
        else:
            self.loop.poller.forget(self.upstream_fd)

    def _watch_client(self, events: int) -> None:
        if events == self.client_events:
            return
        self.client_events = events
        if events:
            self.loop.poller.watch(self.client.fd, events, self._on_client)
        else:
            self.loop.poller.forget(self.client.fd)

    def expire(self, now: float) -> None:
        self.loop.worker.log.warning("upstream stalled mid-body for %s s", self.timeout)
        self.end("UpstreamTimeout", abort=True)

    def end(self, why: str | None, abort: bool = False) -> None:
        """The body is done, or abandoned (*abort*, *why* for the log when not the
        upstream's own failure); the client connection is kept or closed."""
        if self.over:
            return
        self.over = True
        loop = self.loop
        loop.relays.discard(self)
        self._watch_upstream(False)
        self._watch_client(0)
        if why is not None:
            record = getattr(self.feed, "abort", None)
            if record is not None:
                record(why)
        try:
            close_body(self.out.body)
        except Exception:
            loop.worker.log.exception("Error closing a response body")
        if abort or not self.out.keep or not loop.worker.alive:
            self.client.close()
        else:
            self.client.keep(self.out.buffered)


class TunnelRelay:
    """Relays an accepted upgrade's bytes both ways."""

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
        self.watched: dict[int, int] = {}
        self.over = False
        self.loop.relays.add(self)
        self.sock.setblocking(False)
        self.upstream.setblocking(False)
        self._step(0)

    def _next_deadline(self) -> float | None:
        deadlines = [self.end_of_life] if self.end_of_life is not None else []
        if self.idle_timeout:
            deadlines.append(self.last + self.idle_timeout)
        return min(deadlines) if deadlines else None

    def _step(self, mask: int) -> None:
        if self.over:
            return
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
                self.loop.call_soon(lambda: self._step(0))  # fair to the other connections
        except ConnectionError:
            self.end("reset")
            return
        except OSError:
            self.end("error")
            return
        self.deadline = self._next_deadline()
        wanted: dict[int, int] = {}
        for flow in self.flows:
            if not flow.done and flow.wait is not None:
                sock, event = flow.wait
                fd = sock.fileno()
                wanted[fd] = wanted.get(fd, 0) | event
        poller = self.loop.poller
        for fd in [fd for fd in self.watched if fd not in wanted]:
            poller.forget(fd)
            del self.watched[fd]
        for fd, events in wanted.items():
            if self.watched.get(fd) != events:
                poller.watch(fd, events, self._step)
                self.watched[fd] = events

    def expire(self, now: float) -> None:
        if self.end_of_life is not None and now >= self.end_of_life:
            self.end("lifetime")
        else:
            self.end("idle")

    def end(self, why: str) -> None:
        if self.over:
            return
        self.over = True
        loop = self.loop
        loop.relays.discard(self)
        for fd in self.watched:
            loop.poller.forget(fd)
        self.watched.clear()
        try:
            self.out.tunnel.finish(self.flows[0].moved, self.flows[1].moved, why)
            close_body(self.out.body)
        except Exception:
            loop.worker.log.exception("Error closing a tunnel")
        self.client.close()
