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

import select
import selectors
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
