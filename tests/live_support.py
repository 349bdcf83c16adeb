"""A live-traffic upstream for the streaming, WebSocket and browser tests.

One real werkzeug server (threaded, HTTP/1.1, optionally TLS) that serves
WebSockets (``simple-websocket``), raw Upgrade protocols written by hand on
the socket, gated event streams and a small page. Every request is recorded.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import simple_websocket
from werkzeug.serving import WSGIRequestHandler, make_server

from .support import make_pki

Env = dict[str, Any]
Args = dict[str, str]

#: How long any upstream handler waits for the test before giving up.
PATIENCE = 60.0


class _QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Dropped:
    """The response of a handler that took the socket over: werkzeug writes nothing."""

    def __iter__(self) -> Iterator[bytes]:
        raise ConnectionAbortedError("the connection was taken over")


@dataclass
class Request:
    path: str
    query: str
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class LiveUpstream:
    """The upstream. ``gate(name)`` is an event the test sets to let a stream go on;
    ``note(name)`` an event the upstream sets when something happened."""

    tls: ssl.SSLContext | None = None
    server: Any = None
    port: int = 0
    seen: list[Request] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    received: dict[str, bytes] = field(default_factory=dict)
    active: int = 0
    peak: int = 0
    _gates: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def gate(self, name: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(name, threading.Event())

    note = gate

    def requests_to(self, path: str) -> list[Request]:
        return [r for r in self.seen if r.path == path]

    def _event(self, text: str) -> None:
        with self._lock:
            self.log.append(text)

    # -- the app ---------------------------------------------------------------

    def app(self, environ: dict[str, Any], start_response: Any) -> Any:
        headers = {
            k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        path = environ["PATH_INFO"]
        query = environ.get("QUERY_STRING", "")
        self.seen.append(Request(path, query, headers))
        args = {k: v[0] for k, v in parse_qs(query).items()}
        name = "route_" + path.strip("/").replace("/", "_").replace("-", "_")
        handler = getattr(self, name, None)
        if handler is None:
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        return handler(environ, start_response, args)

    def route_ws_echo(self, environ: Env, start_response: Any, args: Args) -> Any:
        ws = simple_websocket.Server.accept(environ, receive_bytes=256 * 1024)
        name = args.get("id", "echo")
        self._count(+1)
        try:
            while True:
                message = ws.receive(timeout=PATIENCE)
                if message is None:
                    break
                ws.send(message)
        except simple_websocket.ConnectionClosed:
            pass
        finally:
            self._count(-1)
            _hang_up(environ["werkzeug.socket"])
            self.note(f"closed:{name}").set()
        return _Dropped()

    def route_ws_goodbye(self, environ: Env, start_response: Any, args: Args) -> Any:
        ws = simple_websocket.Server.accept(environ)
        ws.send("goodbye")
        ws.close(reason=4000, message="upstream is done")
        _hang_up(environ["werkzeug.socket"])
        self.note("goodbye-sent").set()
        return _Dropped()

    def route_ws_refuse(self, environ: Env, start_response: Any, args: Args) -> Any:
        body = b"no websocket for you\n"
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
                ("Www-Authenticate", 'Bearer realm="upstream"'),
            ],
        )
        return [body]

    def route_raw_count(self, environ: Env, start_response: Any, args: Args) -> Any:
        """Upgrade to ``x-count``: read until the client's half-close, answer, close."""
        sock: socket.socket = environ["werkzeug.socket"]
        sock.sendall(_switch("x-count"))
        sock.settimeout(PATIENCE)
        total = 0
        while chunk := sock.recv(65536):
            total += len(chunk)
        self._event(f"count:eof:{total}")
        sock.sendall(f"got {total}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        return _Dropped()

    def route_raw_early(self, environ: Env, start_response: Any, args: Args) -> Any:
        """Upgrade to ``x-early``: say something with the 101, half-close, keep reading."""
        sock: socket.socket = environ["werkzeug.socket"]
        sock.sendall(_switch("x-early") + b"right away\n")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(PATIENCE)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        self.received["early"] = data
        self.note("early-done").set()
        return _Dropped()

    def route_raw_wrong(self, environ: Env, start_response: Any, args: Args) -> Any:
        """Answers 101 with a protocol nobody asked for."""
        sock: socket.socket = environ["werkzeug.socket"]
        sock.sendall(_switch("something-else") + b"never relayed\n")
        time.sleep(0.5)
        return _Dropped()

    def route_stream(self, environ: Env, start_response: Any, args: Args) -> Any:
        """Two pieces; the second only once the test opened gate ``id``.

        ``type`` is the Content-Type; ``close=1`` answers HTTP/1.0 style (no
        length, no chunking: the body ends when the connection does);
        ``counted=1`` declares the body's length (``prelude=N`` makes it long).
        """
        name = args["id"]
        first, second = args.get("first", "data: one\n\n"), args.get("second", "data: two\n\n")
        prelude = b"h" * int(args.get("prelude", "0")) + (b"\n" if "prelude" in args else b"")
        content_type = args.get("type", "text/event-stream")
        if args.get("close"):
            sock: socket.socket = environ["werkzeug.socket"]
            sock.sendall(
                (
                    f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
                ).encode()
                + prelude
                + first.encode()
            )
            opened = self.gate(name).wait(PATIENCE)
            self._event(f"{name}:second:{'after-gate' if opened else 'gate-timeout'}")
            sock.sendall(second.encode())
            sock.shutdown(socket.SHUT_RDWR)
            return _Dropped()
        headers = [("Content-Type", content_type), ("Cache-Control", "no-cache")]
        if args.get("counted"):
            headers.append(("Content-Length", str(len(prelude) + len(first) + len(second))))
        start_response("200 OK", headers)

        def body() -> Iterator[bytes]:
            yield prelude + first.encode()
            opened = self.gate(name).wait(PATIENCE)
            self._event(f"{name}:second:{'after-gate' if opened else 'gate-timeout'}")
            yield second.encode()

        return body()

    def route_ticks(self, environ: Env, start_response: Any, args: Args) -> Any:
        """``n`` events, ``every`` seconds apart (a long-lived stream)."""
        n, every = int(args.get("n", "5")), float(args.get("every", "0.5"))
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def body() -> Iterator[bytes]:
            for i in range(n):
                yield f"data: tick {i}\n\n".encode()
                time.sleep(every)

        return body()

    def route_held(self, environ: Env, start_response: Any, args: Args) -> Any:
        """One event, then held open until gate ``id`` opens; counts concurrent holders."""
        name = args["id"]
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def body() -> Iterator[bytes]:
            self._count(+1)
            try:
                yield b"data: held\n\n"
                self.gate(name).wait(PATIENCE)
                yield b"data: released\n\n"
            finally:
                self._count(-1)

        return body()

    def route_quiet(self, environ: Env, start_response: Any, args: Args) -> Any:
        """One event, then silence (``chatty=1``: a comment every 0.2 s) until the
        proxy closes the connection, which is noted as ``gone:<id>``.
        ``counted=1`` declares a length (over the small-body limit)."""
        name, chatty = args["id"], bool(args.get("chatty"))
        sock: socket.socket = environ["werkzeug.socket"]
        headers = [("Content-Type", "text/event-stream")]
        first = b"data: hello\n\n"
        if args.get("counted"):  # a long declared length, most of it never sent
            first += b":" * 100_000 + b"\n\n"
            headers.append(("Content-Length", str(10 * len(first))))
        start_response("200 OK", headers)

        def body() -> Iterator[bytes]:
            yield first
            deadline = time.monotonic() + PATIENCE
            with selectors.DefaultSelector() as selector:
                selector.register(sock, selectors.EVENT_READ)
                while time.monotonic() < deadline:
                    if selector.select(0.2):
                        try:
                            gone = sock.recv(1, socket.MSG_PEEK) == b""
                        except OSError:
                            gone = True
                        if gone:
                            self.note(f"gone:{name}").set()
                            return
                    if chatty:
                        yield b": still here\n\n"

        return body()

    def route_late(self, environ: Env, start_response: Any, args: Args) -> Any:
        """The response head only comes once gate ``id`` opens."""
        name = args["id"]
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            self.gate(name).wait(PATIENCE)
            yield b"late but here"

        return body()

    def route_page(self, environ: Env, start_response: Any, args: Args) -> Any:
        body = PAGE.encode()
        start_response(
            "200 OK",
            [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def route_events(self, environ: Env, start_response: Any, args: Args) -> Any:
        start_response(
            "200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        )

        def body() -> Iterator[bytes]:
            yield b"retry: 60000\n\n"
            yield b"data: hello from sse\n\n"
            self.gate("events-done").wait(PATIENCE)

        return body()

    def _count(self, delta: int) -> None:
        with self._lock:
            self.active += delta
            self.peak = max(self.peak, self.active)

    # -- running ---------------------------------------------------------------

    def start(self) -> LiveUpstream:
        self.server = make_server(
            "127.0.0.1",
            0,
            self.app,
            threaded=True,
            request_handler=_QuietHandler,
            ssl_context=self.tls,
        )
        self.server.daemon_threads = True
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for event in list(self._gates.values()):
            event.set()
        self.server.shutdown()
        self.server.server_close()


def _hang_up(sock: socket.socket) -> None:
    # werkzeug keeps the socket open until its handler returns; a WebSocket
    # server closes the TCP connection first once the close handshake is done.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _switch(protocol: str) -> bytes:
    return (
        f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    ).encode()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>live</title></head>
<body>
<p>WebSocket: <span id="ws">waiting</span></p>
<p>EventSource: <span id="sse">waiting</span></p>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://")
                         + location.host + "/ws/echo?id=browser");
ws.onopen = () => ws.send("hello from the browser");
ws.onmessage = (e) => {
  document.getElementById("ws").textContent = "echo: " + e.data;
  ws.close(1000, "done");
};
ws.onerror = () => { document.getElementById("ws").textContent = "error"; };
const es = new EventSource("/events");
es.onmessage = (e) => { document.getElementById("sse").textContent = e.data; es.close(); };
es.onerror = () => { document.getElementById("sse").textContent += " (error)"; };
</script>
</body></html>
"""


# -- TLS material for a wss-behind-https upstream ---------------------------------


@dataclass
class TLSFiles:
    ca: Path
    server: ssl.SSLContext


def make_tls(directory: Path) -> TLSFiles:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it."""
    pki = make_pki(directory)
    return TLSFiles(ca=pki.ca, server=pki.server_context())


# -- helpers for the tests ----------------------------------------------------------


def live_config(upstream: LiveUpstream, token: str, **upstream_options: Any) -> dict[str, Any]:
    """JSON access log and the test token injected, as in the core tests."""
    return {
        "upstream": {"url": upstream.url, **upstream_options},
        "pipeline": [
            {"use": "access-log", "format": "json"},
            {"use": "inject-headers", "set": {"Authorization": f"Bearer {token}"}},
        ],
    }


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head from a raw socket: (head, whatever came after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed in the response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_until_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
