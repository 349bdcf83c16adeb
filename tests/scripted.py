"""A scripted upstream for fault and adversarial tests: raw sockets, any bytes, any timing.

:class:`ScriptedUpstream` accepts connections on 127.0.0.1 and, for every
request it reads, calls ``script(conn, request)``: the script writes whatever
it likes (valid HTTP or not), may stall, reset or close. Requests are read
with their Content-Length or chunked body, so keep-alive works when the script
wants it. Nothing here parses HTTP on behalf of the code under test.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Request:
    """One request as the scripted upstream read it: the head as bytes, and the body."""

    head: bytes
    body: bytes
    connection: int  # 0 for the first connection accepted, 1 for the next...

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def target(self) -> str:
        return self.request_line.split(" ")[1]

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, sep, value = line.decode("latin-1").partition(":")
            if sep and key.strip().lower() == name.lower():
                return value.strip()
        return None


Script = Callable[[socket.socket, Request], "bool | None"]


def reset(conn: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class ScriptedUpstream:
    """Runs *script* for each request; the script returns True to keep the connection.

    ``requests`` lists every :class:`Request` read; ``release`` (an Event) lets
    a stalling script wait until the test is done with it.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.release = threading.Event()
        self.closed = threading.Event()  # set when a client connection ends
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._connections = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                number = self._connections
                self._connections += 1
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        conn.settimeout(60)
        try:
            while True:
                request, buffer = _read_request(conn, buffer, number)
                if request is None:
                    return
                self.requests.append(request)
                if not self.script(conn, request):
                    return
        except OSError:
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass
            self.closed.set()

    def stop(self) -> None:
        self._stop.set()
        self.release.set()
        self._listener.close()
        self._thread.join(5)

    def __enter__(self) -> ScriptedUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_request(conn: socket.socket, buffer: bytes, number: int) -> tuple[Request | None, bytes]:
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None, b""
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    request = Request(head, b"", number)
    length = request.header("Content-Length")
    if length is not None:
        size = int(length)
        while len(buffer) < size:
            data = conn.recv(65536)
            if not data:
                return None, b""
            buffer += data
        request.body, buffer = buffer[:size], buffer[size:]
    elif (request.header("Transfer-Encoding") or "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return None, b""
                buffer += data
            line, _, buffer = buffer.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(buffer) < size + 2:
                data = conn.recv(65536)
                if not data:
                    return None, b""
                buffer += data
            if size == 0:
                buffer = buffer[2:]  # no trailers are ever sent by the proxy
                break
            body += buffer[:size]
            buffer = buffer[size + 2 :]
        request.body = body
    return request, buffer
