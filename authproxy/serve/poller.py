"""Readiness of the worker's sockets: epoll where there is one, else the selectors module.

One interface for :mod:`authproxy.serve.worker`: ``watch`` a descriptor with a
handler (level-triggered, for the loop's own use), or ``arm`` it for one read
event (``EPOLLONESHOT``): the first event disarms it, so the descriptor can
go to a pool thread without a system call, and that thread arms it again
itself when the connection is idle once more, without waking the loop. Only
the loop thread calls :meth:`Poller.poll`, ``watch`` and ``forget``; ``arm``
may be called from any thread.

Without epoll (macOS, the BSDs) the selectors module stands in and ``arm``
from another thread is passed to the loop through *defer*.
"""

from __future__ import annotations

import os
import queue
import select
import selectors
from collections import deque
from collections.abc import Callable
from typing import Any

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
Handler = Callable[[int], None]


class EpollPoller:
    """epoll: one-shot reads armed from any thread."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}

    def watch(self, fd: int, events: int, handler: Handler) -> None:
        """Report *events* on *fd* to *handler* until told otherwise (loop thread only)."""
        self._handlers[fd] = handler
        self._set(fd, _mask(events))

    def arm(self, fd: int, handler: Handler) -> None:
        """Report the next read event on *fd*, once (any thread)."""
        self._handlers[fd] = handler
        self._set(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def _set(self, fd: int, mask: int) -> None:
        try:
            self._epoll.modify(fd, mask)
        except FileNotFoundError:
            self._epoll.register(fd, mask)

    def forget(self, fd: int) -> None:
        """Stop watching *fd*; before it is closed (loop thread only)."""
        self._handlers.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass

    def poll(self, timeout: float) -> list[tuple[Handler, int]]:
        ready = []
        for fd, mask in self._epoll.poll(timeout):
            handler = self._handlers.get(fd)
            if handler is not None:
                events = (READ if mask & _IN else 0) | (WRITE if mask & select.EPOLLOUT else 0)
                ready.append((handler, events or READ))
        return ready

    def close(self) -> None:
        self._epoll.close()


class SelectorPoller:
    """The selectors module, for systems without epoll."""

    def __init__(self, defer: Callable[[Callable[[], None]], None]) -> None:
        self._selector = selectors.DefaultSelector()
        self._defer = defer

    def watch(self, fd: int, events: int, handler: Handler) -> None:
        try:
            self._selector.modify(fd, events, handler)
        except KeyError:
            self._selector.register(fd, events, handler)

    def arm(self, fd: int, handler: Handler) -> None:
        self._defer(lambda: self.watch(fd, READ, self._once(fd, handler)))

    def _once(self, fd: int, handler: Handler) -> Handler:
        def once(events: int) -> None:
            self.forget(fd)
            handler(events)

        return once

    def forget(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def poll(self, timeout: float) -> list[tuple[Handler, int]]:
        return [(key.data, events) for key, events in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()


def make_poller(defer: Callable[[Callable[[], None]], None]) -> Any:
    """An :class:`EpollPoller`, or a :class:`SelectorPoller` where ``select.epoll`` is missing."""
    if hasattr(select, "epoll"):
        return EpollPoller()
    return SelectorPoller(defer)


_IN = (
    getattr(select, "EPOLLIN", 1) | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)
)


def _mask(events: int) -> int:
    mask = 0
    if events & READ:
        mask |= select.EPOLLIN
    if events & WRITE:
        mask |= select.EPOLLOUT
    return mask


class EpollReady:
    """Where pool threads wait for work: idle connections' next requests, and
    requests the loop read in full (:meth:`put`).

    Idle connections are armed for one read event (:meth:`arm`); the thread
    whose ``epoll_wait`` reports it owns the connection and serves the request
    itself, with no hand-off through the loop. Who owns an idle connection,
    that thread or the loop expiring it (:meth:`disarm`), is settled by
    ``dict.pop``, atomic under the GIL.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._idle: dict[int, Any] = {}
        self._handed: deque[Any] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)

    def put(self, client: Any) -> None:
        """Give *client* (or None: a thread is to stop) to a pool thread."""
        self._handed.append(client)
        os.write(self._wake_w, b"x")

    def arm(self, client: Any) -> None:
        """Let a pool thread take *client* when its next request arrives (any thread)."""
        self._idle[client.fd] = client
        mask = select.EPOLLIN | select.EPOLLONESHOT
        try:
            self._epoll.modify(client.fd, mask)
        except FileNotFoundError:
            self._epoll.register(client.fd, mask)

    def disarm(self, client: Any) -> bool:
        """Take back an idle *client* (the loop, to close it); False if a thread has it."""
        if self._idle.pop(client.fd, None) is None:
            return False
        try:
            self._epoll.unregister(client.fd)
        except OSError:
            pass
        return True

    def idle(self) -> list[Any]:
        return list(self._idle.values())

    def take(self) -> tuple[Any, bool]:
        """Wait for work (pool threads): (client, True if its next request is to be
        read), or (None, False) when the thread is to stop."""
        while True:
            try:
                return self._handed.popleft(), False
            except IndexError:
                pass
            for fd, _ in self._epoll.poll(1.0, 1):
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 1)
                    except BlockingIOError:
                        pass
                    continue
                client = self._idle.pop(fd, None)
                if client is not None:  # else: expired and closed meanwhile
                    return client, True

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class QueueReady:
    """:class:`EpollReady` without epoll: idle connections wait in the loop's
    selector (*wait_in_loop*), which reads each request and :meth:`put` s it."""

    def __init__(self, wait_in_loop: Callable[[Any], None]) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wait_in_loop = wait_in_loop

    def put(self, client: Any) -> None:
        self._queue.put(client)

    def arm(self, client: Any) -> None:
        self._wait_in_loop(client)

    def disarm(self, client: Any) -> bool:
        return False

    def idle(self) -> list[Any]:
        return []

    def take(self) -> tuple[Any, bool]:
        return self._queue.get(), False

    def close(self) -> None:
        pass
