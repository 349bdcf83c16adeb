"""Copying bytes both ways between two sockets: the body of a WebSocket tunnel."""

from __future__ import annotations

import selectors
import socket
import ssl
import time


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
        Flow(client, upstream, to_upstream, chunk_size),
        Flow(upstream, client, to_client, chunk_size),
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


class Flow:
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
