"""Unbuffered streaming through authproxy under real gunicorn: event streams and
unknown-length bodies flow piece by piece, long streams outlive worker timeouts,
a departed client closes the upstream response, gevent holds many streams."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from .live_support import PATIENCE, LiveUpstream, live_config, make_tls
from .support import TOKEN, Proxy

WORKERS = ["authproxy", "gthread", "gevent"]

#: (Content-Type, extra query) of responses that must be relayed as they come.
STREAMS = {
    "sse": ("text/event-stream", {}),
    "sse-with-parameters": ("text/event-stream; charset=utf-8", {}),
    "sse-any-case": ("Text/Event-Stream", {}),
    "watch-chunked": (
        "application/json",
        {"first": '{"type":"ADDED"}\n', "second": '{"type":"DELETED"}\n'},
    ),
    "close-delimited": ("application/octet-stream", {"close": "1"}),
    # A declared length over the small-body limit: relayed socket to socket.
    "counted": ("application/octet-stream", {"counted": "1", "prelude": "100000"}),
    # SockJS xhr_streaming: a 2 KiB prelude of "h", the open frame, then messages.
    "sockjs-xhr-streaming": (
        "application/javascript; charset=UTF-8",
        {"prelude": "2048", "first": "o\n", "second": 'a["hello"]\n'},
    ),
}


@pytest.fixture
def live() -> Iterator[LiveUpstream]:
    server = LiveUpstream().start()
    yield server
    server.stop()


def get(proxy: Proxy, target: str, timeout: float = PATIENCE / 2) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    conn.request("GET", target)
    return conn.getresponse()


def read_until(response: http.client.HTTPResponse, marker: bytes) -> bytes:
    """Read what has arrived, piece by piece, until *marker* is in it."""
    data = b""
    while marker not in data:
        piece = response.read1(65536)
        if not piece:
            raise AssertionError(f"the body ended before {marker!r}: {data[-200:]!r}")
        data += piece
    return data


@pytest.mark.parametrize("worker_class", WORKERS)
@pytest.mark.parametrize("kind", list(STREAMS))
def test_each_piece_reaches_the_client_before_the_upstream_sends_the_next(
    live: LiveUpstream, start_proxy: Callable[..., Proxy], kind: str, worker_class: str
) -> None:
    content_type, extra = STREAMS[kind]
    query = {"id": kind, "type": content_type, **extra}
    first = extra.get("first", "data: one\n\n").encode()
    second = extra.get("second", "data: two\n\n").encode()
    proxy = start_proxy({**live_config(live, TOKEN), "server": {"worker_class": worker_class}})
    response = get(proxy, "/stream?" + urlencode(query))
    assert response.status == 200
    assert response.getheader("Content-Type") == content_type
    # The upstream sends the second piece only after this line: a proxy holding
    # the first one back would make this read time out.
    received = read_until(response, first)
    assert second not in received
    live.gate(kind).set()
    received += response.read()
    response.close()
    assert received.endswith(first + second)
    if "prelude" in extra:
        assert received.startswith(b"h" * int(extra["prelude"]) + b"\n")
    assert f"{kind}:second:after-gate" in live.log


def test_a_pipelined_request_is_not_taken_for_a_departed_client(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE / 2) as sock:
        sock.sendall(
            b"GET /stream?id=pipelined HTTP/1.1\r\nHost: p\r\n\r\n"
            b"GET /after HTTP/1.1\r\nHost: p\r\n\r\n"
        )
        first = http.client.HTTPResponse(sock)
        first.begin()
        read_until(first, b"data: one\n\n")
        live.gate("pipelined").set()
        assert first.read().endswith(b"data: two\n\n")
        second = http.client.HTTPResponse(sock)
        second.begin()
        assert second.read() == b"ok"
    assert live.requests_to("/after")[0].header("Authorization") == f"Bearer {TOKEN}"


@pytest.mark.parametrize("worker_class", WORKERS)
@pytest.mark.parametrize("mode", ["quiet", "chatty", "quiet-counted"])
def test_a_departed_client_closes_the_upstream_response(
    live: LiveUpstream, start_proxy: Callable[..., Proxy], worker_class: str, mode: str
) -> None:
    """The upstream notices within a couple of seconds, not at the next write or the
    60 s read timeout, even when it has nothing to say (a quiet watch). With a
    declared length, gthread moves the body socket to socket: the same holds."""
    name = f"{worker_class}-{mode}"
    upstream_talks = mode == "chatty"
    config = live_config(live, TOKEN, read_timeout=60.0)
    proxy = start_proxy({**config, "server": {"worker_class": worker_class}})
    query = urlencode(
        {
            "id": name,
            **({"chatty": "1"} if upstream_talks else {}),
            **({"counted": "1"} if "counted" in mode else {}),
        }
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE / 2) as sock:
        sock.sendall(f"GET /quiet?{query} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        read_until(response, b"data: hello\n\n")
        response.close()
    # The client has gone away.
    assert live.note(f"gone:{name}").wait(10.0), "the upstream still holds the response"
    line = proxy.access_line("/quiet")
    if mode == "quiet":  # noticed while waiting (else a write may fail first, in the server)
        assert line["aborted"] == "ClientGone"


@pytest.mark.parametrize("worker_class", WORKERS)
def test_a_long_stream_outlives_the_worker_timeout(
    live: LiveUpstream, start_proxy: Callable[..., Proxy], worker_class: str
) -> None:
    config = live_config(live, TOKEN)
    proxy = start_proxy({**config, "server": {"worker_class": worker_class, "timeout": 3.0}})
    pids = proxy.worker_pids()
    response = get(proxy, "/ticks?n=16&every=0.5")  # some 8 s, over two worker timeouts
    body = response.read()
    assert body == b"".join(f"data: tick {i}\n\n".encode() for i in range(16))
    assert proxy.worker_pids() == pids


def test_gevent_holds_a_hundred_streams_in_one_worker(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    count = 100
    proxy = start_proxy(
        {**live_config(live, TOKEN), "server": {"worker_class": "gevent"}}, workers=1, threads=4
    )
    assert len(proxy.worker_pids()) == 1
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE / 2)
            sock.sendall(b"GET /held?id=many HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
            socks.append(sock)
        responses = []
        for sock in socks:  # every stream has started before any is released
            response = http.client.HTTPResponse(sock)
            response.begin()
            read_until(response, b"data: held\n\n")
            responses.append(response)
        assert live.peak >= count
        live.gate("many").set()
        for response in responses:
            assert response.read().endswith(b"data: released\n\n")
    finally:
        for sock in socks:
            sock.close()
    assert len(proxy.worker_pids()) == 1


def test_gevent_keeps_serving_while_a_tls_upstream_is_slow(
    tmp_path: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Upstream TLS must yield to other greenlets (urllib3 was imported before the
    worker monkey-patched ssl)."""
    tls = make_tls(tmp_path)
    live = LiveUpstream(tls=tls.server).start()
    try:
        config = live_config(live, TOKEN, tls_verify=str(tls.ca))
        proxy = start_proxy({**config, "server": {"worker_class": "gevent"}}, workers=1)
        late: list[bytes] = []
        waiting = threading.Thread(
            target=lambda: late.append(get(proxy, "/late?id=tls", timeout=PATIENCE).read())
        )
        waiting.start()
        for _ in range(int(PATIENCE / 0.05)):
            if live.requests_to("/late"):
                break
            threading.Event().wait(0.05)
        assert live.requests_to("/late"), "the slow request never reached the upstream"
        # While that one waits for the upstream's answer, the worker serves others.
        other = get(proxy, "/plain", timeout=15.0)
        assert other.read() == b"ok"
        live.gate("tls").set()
        waiting.join(PATIENCE)
        assert late == [b"late but here"]
    finally:
        live.stop()
