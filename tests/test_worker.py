"""authproxy's worker (authproxy.serve.worker) through a real ``authproxy serve``.

Scaled to the CI machine: one worker with two threads holds 200 tunnels, 200
streams and 200 slow clients at once, each of which would take a thread of
its own under gunicorn's gthread worker, while ``/healthz`` keeps answering.
The upstream here is one thread with a selector, so the test process holds
those connections without a thread each either.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from authproxy.upstream.tunnel import TOKEN_GRACE

from .conftest import bearer_config
from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims
from .raw_upstream import RawUpstream
from .support import Proxy, Upstream, wait_until

MANY = 200


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    server = RawUpstream()
    yield server
    server.stop()


def small_proxy(start_proxy: Callable[..., Proxy], url: str, **server: Any) -> Proxy:
    config: dict[str, Any] = {
        "upstream": {"url": url},
        "server": {"workers": 1, "threads": 2, **server},
        "pipeline": [{"use": "access-log", "format": "json"}],
    }
    return start_proxy(config)


def healthz_ms(proxy: Proxy) -> float:
    started = time.monotonic()
    answer = requests.get(f"{proxy.url}/healthz", timeout=10)
    assert answer.status_code == 200
    return (time.monotonic() - started) * 1000


def connect(proxy: Proxy, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
    sock.sendall(request)
    return sock


def read_exactly(sock: socket.socket, until: bytes) -> bytes:
    data = b""
    while until not in data:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"closed before {until!r}: {data!r}")
        data += piece
    return data


def worker_threads(proxy: Proxy) -> int:
    (pid,) = proxy.worker_pids()
    return len(os.listdir(f"/proc/{pid}/task"))


def test_tunnels_cost_a_socket_not_a_thread(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    proxy = small_proxy(start_proxy, raw_upstream.url)
    upgrade = (
        b"GET /tunnel HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    socks = [connect(proxy, upgrade) for _ in range(MANY)]
    try:
        for sock in socks:
            assert read_exactly(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        for n, sock in enumerate(socks):
            sock.sendall(b"ping %d;" % n)
        for n, sock in enumerate(socks):
            assert read_exactly(sock, b";") == b"ping %d;" % n
        assert healthz_ms(proxy) < 5000
        assert worker_threads(proxy) < 10
    finally:
        for sock in socks:
            sock.close()
    lines = wait_until(
        lambda: [x for x in proxy.access_lines() if x.get("path") == "/tunnel"][MANY - 1 :],
        what="every tunnel's access line",
    )
    assert lines[0]["status"] == 101


def test_streams_cost_a_socket_not_a_thread(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    proxy = small_proxy(start_proxy, raw_upstream.url)
    socks = [connect(proxy, b"GET /stream HTTP/1.1\r\nHost: p\r\n\r\n") for _ in range(MANY)]
    try:
        for sock in socks:
            assert b"first" in read_exactly(sock, b"first\r\n")
        assert healthz_ms(proxy) < 5000
        assert worker_threads(proxy) < 10
        raw_upstream.release()
        for sock in socks:
            assert read_exactly(sock, b"0\r\n\r\n").endswith(b"4\r\nlast\r\n0\r\n\r\n")
        # Kept alive after the stream: the next request on each connection is answered.
        for sock in socks[:10]:
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: p\r\n\r\n")
            assert read_exactly(sock, b"ok").startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in socks:
            sock.close()
    lines = wait_until(
        lambda: [x for x in proxy.access_lines() if x.get("path") == "/stream"][MANY - 1 :],
        what="every stream's access line",
    )
    assert lines[0]["bytes"] == len("first") + len("last")


def test_a_client_leaving_a_quiet_stream_ends_it(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    proxy = small_proxy(start_proxy, raw_upstream.url)
    sock = connect(proxy, b"GET /stream HTTP/1.1\r\nHost: p\r\n\r\n")
    read_exactly(sock, b"first\r\n")
    sock.close()
    line = wait_until(
        lambda: [x for x in proxy.access_lines() if x.get("path") == "/stream"],
        what="the stream's access line",
    )[0]
    assert line["aborted"] == "ClientGone"


def test_slow_clients_cost_a_socket_and_get_408(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    proxy = small_proxy(start_proxy, raw_upstream.url, header_timeout=2.0)
    socks = [connect(proxy, b"GET /plain HTTP/1.1\r\nHo") for _ in range(MANY)]
    try:
        assert healthz_ms(proxy) < 5000
        answer = requests.get(f"{proxy.url}/plain", timeout=10)
        assert answer.text == "ok"
        started = time.monotonic()
        for sock in socks:
            assert read_exactly(sock, b"\r\n").startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 10
    finally:
        for sock in socks:
            sock.close()


def test_a_stalled_body_gets_408(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    proxy = small_proxy(start_proxy, raw_upstream.url, body_timeout=1.0)
    started = time.monotonic()
    for length in (100, 1_000_000):  # buffered by the loop; read by a thread
        sock = connect(
            proxy, b"POST /plain HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\nabc" % length
        )
        with sock:
            assert read_exactly(sock, b"\r\n").startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 10
    assert healthz_ms(proxy) < 5000


def test_an_upload_refused_before_its_body_holds_a_thread_a_second_at_most(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    """Refused (here cross-origin) with its body unread: the rest is drained for at
    most DRAIN_SECONDS, then the connection is closed, whatever body_timeout says."""
    proxy = small_proxy(start_proxy, raw_upstream.url, threads=2, body_timeout=30.0)
    request = (
        b"POST /plain HTTP/1.1\r\nHost: p\r\nSec-Fetch-Site: cross-site\r\n"
        b"Content-Length: 1000000\r\n\r\nabc"
    )
    started = time.monotonic()
    socks = [connect(proxy, request) for _ in range(4)]  # twice the threads
    for sock in socks:
        with sock:
            assert read_exactly(sock, b"\r\n").startswith(b"HTTP/1.1 403 ")
            while sock.recv(65536):  # then closed by the proxy
                pass
    assert time.monotonic() - started < 10
    assert healthz_ms(proxy) < 5000
    assert proxy.access_line("/plain")["status"] == 403


def test_bodies_that_break_off_do_not_disturb_other_connections(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    """A mid-body upstream failure closes its client connection, once, from the
    loop: descriptors are never closed under a connection that reused the number."""
    proxy = small_proxy(start_proxy, raw_upstream.url, threads=4)
    stop = threading.Event()
    failures: list[BaseException] = []

    def break_bodies() -> None:
        while not stop.is_set():
            try:
                sock = connect(proxy, b"GET /broken HTTP/1.1\r\nHost: p\r\n\r\n")
                with sock:
                    while sock.recv(65536):
                        pass
            except OSError:
                pass

    breakers = [threading.Thread(target=break_bodies) for _ in range(3)]
    for thread in breakers:
        thread.start()
    try:
        with requests.Session() as session:
            for _ in range(300):
                try:
                    assert session.get(f"{proxy.url}/healthz", timeout=5).status_code == 200
                except requests.RequestException as exc:
                    failures.append(exc)
    finally:
        stop.set()
        for thread in breakers:
            thread.join()
    assert failures == []
    assert "Bad file descriptor" not in proxy.logs()


def test_graceful_stop_finishes_requests_and_ends_tunnels(
    start_proxy: Callable[..., Proxy], upstream: Upstream, raw_upstream: RawUpstream
) -> None:
    config = bearer_config(upstream)
    config["server"] = {"workers": 1, "threads": 2, "graceful_timeout": 6.0}
    proxy = start_proxy(config)
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        slow["answer"] = requests.get(f"{proxy.url}/sleep/1.5", timeout=20)

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: upstream.seen, what="the slow request upstream")
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    thread.join(20)
    assert slow["answer"].status_code == 200
    assert proxy.process.wait(20) == 0
    assert time.monotonic() - started < 10


def test_without_epoll_the_worker_still_serves(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream, tmp_path: Any
) -> None:
    """macOS and the BSDs have no epoll: the selectors module picks another."""
    (tmp_path / "sitecustomize.py").write_text(
        "import select, selectors\n"
        "del select.epoll\n"
        "selectors.DefaultSelector = selectors.PollSelector\n"
    )
    config: dict[str, Any] = {"upstream": {"url": raw_upstream.url}}
    config["server"] = {"workers": 1, "threads": 2}
    proxy = start_proxy(config, env={"PYTHONPATH": str(tmp_path)})
    with requests.Session() as session:
        for n in range(3):
            assert session.get(f"{proxy.url}/plain?{n}", timeout=10).text == "ok"
    (pid,) = proxy.worker_pids()
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    assert "anon_inode:[eventpoll]" not in fds


@pytest.mark.parametrize("worker_class", ["authproxy", "gthread"])
def test_a_tunnel_ends_when_the_token_that_opened_it_expires(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream, worker_class: str
) -> None:
    key = SigningKey("RSA")
    with JwksServer([key]) as jwks:
        proxy_config = {
            "upstream": {"url": raw_upstream.url},
            "server": {"workers": 1, "threads": 2, "worker_class": worker_class},
            "pipeline": [
                {"use": "access-log", "format": "json"},
                {
                    "use": "identity",
                    "team_domain": TEAM_DOMAIN,
                    "audience": [AUDIENCE],
                    "certs_url": jwks.url,
                },
            ],
        }
        proxy = start_proxy(proxy_config)
        expires = int(time.time()) + 2
        token = key.sign(claims(exp=expires))
        sock = connect(
            proxy,
            b"GET /tunnel HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Cf-Access-Jwt-Assertion: %s\r\n\r\n" % token.encode(),
        )
        with sock:
            assert read_exactly(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
            sock.sendall(b"still here;")
            assert read_exactly(sock, b";") == b"still here;"
            sock.settimeout(expires + TOKEN_GRACE + 10 - time.time())
            assert sock.recv(100) == b""  # closed by the proxy, not by the test's timeout
        assert time.time() >= expires + TOKEN_GRACE - 0.5
    line = wait_until(
        lambda: [x for x in proxy.access_lines() if x.get("path") == "/tunnel"],
        what="the tunnel's access line",
    )[0]
    assert line["tunnel_end"] == "lifetime"


def test_an_upgrade_not_listed_never_opens_a_tunnel_even_if_the_upstream_switches(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    """The upstream here answers 101 to anything. An `h2c` or `foo` upgrade goes on
    as a plain request, so its 101 is a 502, that upstream connection is dropped,
    and the client's connection stays HTTP: its next request is an ordinary one."""
    proxy = small_proxy(start_proxy, raw_upstream.url)
    for protocol in (b"h2c", b"foo"):
        with connect(
            proxy,
            b"GET /tunnel HTTP/1.1\r\nHost: p\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: %s\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n" % protocol,
        ) as sock:
            assert read_exactly(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 502 ")
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: p\r\n\r\n")
            assert read_exactly(sock, b"ok").split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"


def test_a_stopping_worker_ends_its_tunnels_after_graceful_timeout(
    start_proxy: Callable[..., Proxy], raw_upstream: RawUpstream
) -> None:
    proxy = small_proxy(start_proxy, raw_upstream.url, graceful_timeout=4.0)
    upgrade = (
        b"GET /tunnel HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    with connect(proxy, upgrade) as sock:
        assert read_exactly(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        sock.sendall(b"still open;")  # the tunnel carries on through the grace period
        assert read_exactly(sock, b";") == b"still open;"
        sock.settimeout(20)
        assert sock.recv(100) == b""
        assert 3.0 <= time.monotonic() - started < 15
    assert proxy.process.wait(20) == 0
    (line,) = [x for x in proxy.access_lines() if x.get("path") == "/tunnel"]
    assert line["tunnel_end"] == "shutdown"
