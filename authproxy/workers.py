"""The gunicorn worker ``authproxy serve`` runs for ``worker_class = "gthread"``."""

from __future__ import annotations

import time

from gunicorn.http import wsgi
from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker


class ThreadWorker(_GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, with a heartbeat that costs nothing per request.

    gunicorn's worker touches its heartbeat file (a ``utime`` system call) on
    every turn of its event loop, which under load is every request or two.
    The arbiter only needs to hear from a worker within ``timeout`` seconds:
    this one touches the file at most every quarter of that, and at least once
    a second.
    """

    _last_notify = float("-inf")

    def init_process(self) -> None:
        # gunicorn's wsgi.create() looks its response class up at call time.
        wsgi.Response = Response
        super().init_process()

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._last_notify >= min(1.0, self.timeout / 4):
            self._last_notify = now
            super().notify()


class Response(wsgi.Response):  # type: ignore[misc]
    """gunicorn's HTTP/1 response, sending its head together with the first body bytes.

    gunicorn writes the head and each body piece with separate system calls,
    so a small answer leaves in two packets. Here the head waits for the first
    piece of body (or for the end) and both go in one ``sendall``.
    """

    headers_sent: bool
    _head = b""
    _joining = False

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

    def _emit_body(self, data: bytes) -> None:
        head, self._head = self._head, b""
        if not head:
            super()._emit_body(data)
        elif self.chunked:
            self.sock.sendall(b"%s%X\r\n%s\r\n" % (head, len(data), data))
        else:
            self.sock.sendall(head + data)
