"""An upstream on one thread, for holding hundreds of connections without a thread each.

Used by tests/test_worker.py and bench/connections.py.
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Any


class RawUpstream:
    """An upstream on one thread: ``/tunnel`` switches to an echo, ``/stream`` sends a
    chunk and holds the response open until :meth:`release`, ``/broken`` breaks
    off mid-body, anything else answers ``ok``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.streams: list[socket.socket] = []
        self.lock = threading.Lock()
        self._release = False
        self._stop = False
        self._conns: dict[socket.socket, dict[str, Any]] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        """End every held stream with a last chunk."""
        self._release = True

    def stop(self) -> None:
        self._stop = True
        self.thread.join(5)
        for sock in list(self._conns):
            sock.close()
        self.listener.close()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self.selector.select(0.05):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]
            if self._release:
                for sock in self.streams:
                    try:
                        sock.sendall(b"4\r\nlast\r\n0\r\n\r\n")
                    except OSError:
                        pass
                self.streams.clear()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(True)
            self._conns[sock] = {"buf": b"", "mode": "http"}
            self.selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        state = self._conns[sock]
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(sock)
            del self._conns[sock]
            sock.close()
            return
        if state["mode"] == "echo":
            sock.sendall(data)
            return
        state["buf"] += data
        if b"\r\n\r\n" not in state["buf"]:
            return
        head, _, state["buf"] = state["buf"].partition(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        if path.startswith(b"/tunnel"):
            state["mode"] = "echo"
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n"
            )
        elif path.startswith(b"/stream"):
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
            )
            self.streams.append(sock)
        elif path.startswith(b"/broken"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 70000)
            self.selector.unregister(sock)
            del self._conns[sock]
            sock.close()
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
