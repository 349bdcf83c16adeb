"""authproxy's gthread worker: gunicorn's, with a heartbeat that is not per request."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import requests

from authproxy.serve.gthread import ThreadWorker

from .conftest import bearer_config
from .support import wait_until


class Beats:
    def __init__(self) -> None:
        self.count = 0

    def notify(self) -> None:
        self.count += 1


def worker(timeout: float) -> Any:
    w = ThreadWorker.__new__(ThreadWorker)  # no gunicorn arbiter needed for the heartbeat
    w.timeout = timeout
    w.tmp = Beats()
    return w


def test_the_heartbeat_is_touched_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    w = worker(timeout=15)
    for _ in range(100):
        w.notify()
    assert w.tmp.count == 1
    now[0] += 0.5
    w.notify()
    assert w.tmp.count == 1
    now[0] += 0.6
    w.notify()
    assert w.tmp.count == 2


def test_free_memory_goes_back_with_the_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    from authproxy import workers

    trims: list[int] = []

    def trim(pad: int) -> int:
        trims.append(pad)
        return 1

    monkeypatch.setattr(workers, "_malloc_trim", trim)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    w = worker(timeout=15)
    for _ in range(50):
        w.notify()
    now[0] += 1.1
    w.notify()
    assert trims == [0, 0] and w.tmp.count == 2


def test_malloc_trim_is_found_on_glibc() -> None:
    import platform

    from authproxy import workers

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert workers._malloc_trim is not None
    assert workers._malloc_trim(0) in (0, 1)


def test_a_short_timeout_gets_a_faster_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    w = worker(timeout=1)  # gunicorn passes half the configured timeout
    w.notify()
    now[0] += 0.3
    w.notify()
    assert w.tmp.count == 2


def test_busy_and_idle_workers_outlive_a_short_timeout(upstream: Any, start_proxy: Any) -> None:
    """With timeout = 2 the arbiter kills a worker silent for 2 s: under load and
    idle alike, the throttled heartbeat must still reach it in time."""
    config = bearer_config(upstream)
    config["server"] = {"timeout": 2, "workers": 2, "threads": 2}
    proxy = start_proxy(config)
    pids = sorted(proxy.worker_pids())
    with requests.Session() as session:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert session.get(proxy.url + "/", timeout=10).status_code == 200
    time.sleep(4)
    assert sorted(proxy.worker_pids()) == pids
    assert "WORKER TIMEOUT" not in proxy.logs()
    assert "authproxy.serve.gthread.ThreadWorker" in proxy.logs()


# -- the response that sends its head with the first body bytes ----------------


class Recorder:
    """A socket whose sendall calls are kept apart; requests are read from *data*."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.sends: list[bytes] = []

    def recv(self, size: int) -> bytes:
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


def exchange(
    request: bytes, status: str, headers: list[tuple[str, str]], pieces: list[bytes]
) -> Recorder:
    from gunicorn import http
    from gunicorn.config import Config

    from authproxy.serve.gthread import Response

    sock = Recorder(request)
    cfg = Config()
    req = next(http.get_parser(cfg, sock, ("127.0.0.1", 5000)))
    resp = Response(req, sock, cfg)
    resp.start_response(status, headers)
    for piece in pieces:
        resp.write(piece)
    resp.close()
    return sock


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_small_answer_leaves_in_one_send() -> None:
    sock = exchange(GET, "200 OK", [("Content-Length", "5")], [b"hello"])
    (sent,) = sock.sends
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nContent-Length: 5" in head
    assert body == b"hello"


def test_later_pieces_follow_on_their_own() -> None:
    sock = exchange(GET, "200 OK", [("Content-Length", "6")], [b"ab", b"cd", b"ef"])
    assert [s.partition(b"\r\n\r\n")[2] for s in sock.sends[:1]] == [b"ab"]
    assert sock.sends[1:] == [b"cd", b"ef"]


def test_a_chunked_answer_frames_its_first_piece_behind_the_head() -> None:
    sock = exchange(GET, "200 OK", [], [b"hello", b"!"])
    head, _, first = sock.sends[0].partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert first == b"5\r\nhello\r\n"
    assert sock.sends[1:] == [b"1\r\n!\r\n", b"0\r\n\r\n"]


@pytest.mark.parametrize(
    ("request_", "status", "pieces"),
    [
        (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK", [b"dropped"]),
        (GET, "204 No Content", []),
        (GET, "200 OK", [b""]),
    ],
)
def test_an_answer_without_body_bytes_still_sends_its_head(
    request_: bytes, status: str, pieces: list[bytes]
) -> None:
    headers = [("Content-Length", "0")] if status.startswith("200") and request_ == GET else []
    sock = exchange(request_, status, headers, pieces)
    (head,) = sock.sends
    assert head.startswith(f"HTTP/1.1 {status}\r\n".encode()) and head.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("request_", "status", "headers"),
    [
        (GET, "200 OK", [("Content-Length", "1")]),
        (GET, "200 OK", []),  # chunked
        (b"GET / HTTP/1.0\r\n\r\n", "200 OK", []),  # close-delimited
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404 Not Found", []),
    ],
)
def test_the_head_is_gunicorns_own(
    request_: bytes, status: str, headers: list[tuple[str, str]]
) -> None:
    """Same status line, Server, Date, Connection and framing as gunicorn's."""
    from gunicorn import http
    from gunicorn.config import Config
    from gunicorn.http import wsgi

    from authproxy.serve.gthread import Response

    cfg = Config()
    heads = []
    for cls in (wsgi.Response, Response):
        req = next(http.get_parser(cfg, Recorder(request_), ("127.0.0.1", 5000)))
        resp = cls(req, Recorder(b""), cfg)
        resp.start_response(status, list(headers))
        heads.append(resp.default_headers())
    assert heads[0] == heads[1]


def test_the_parent_is_looked_for_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    w = worker(timeout=15)
    w.ppid = -1  # not our parent: gunicorn's check says it changed
    w.log = type("Log", (), {"info": lambda *a: None})()
    assert w.is_parent_alive() is False
    now[0] += 0.5
    assert w.is_parent_alive() is True  # not asked again yet
    now[0] += 0.6
    assert w.is_parent_alive() is False


@pytest.mark.parametrize(
    ("request_", "read", "drained"),
    [
        (GET, 0, True),  # no body at all
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 5, True),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 2, False),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0, False),
    ],
)
def test_only_a_body_left_unread_needs_draining(request_: bytes, read: int, drained: bool) -> None:
    """gunicorn's drain (with its timeout juggling) is skipped only when there
    is certainly nothing left; a chunked body always goes through it."""
    from gunicorn import http
    from gunicorn.config import Config

    from authproxy.serve.gthread import _body_read

    req = next(http.get_parser(Config(), Recorder(request_), ("127.0.0.1", 5000)))
    if read:
        assert len(req.body.read(read)) == read
    assert _body_read(req) is drained


def _sockets_per_worker(pids: list[int], port: int, state: str) -> list[set[str]]:
    """The socket inodes on *port* in TCP *state* ("01" established, "0A" listening)
    that each process holds, from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                    inodes.add(fields[9])
    held = []
    for pid in pids:
        mine = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                mine.add(target[8:-1])
        held.append(mine)
    return held


def test_connections_are_spread_over_the_workers(upstream: Any, start_proxy: Any) -> None:
    """Each worker has a listening socket of its own (SO_REUSEPORT): the kernel
    spreads connections, rather than the first worker to wake taking most."""
    config = bearer_config(upstream)
    config["server"] = {"workers": 2, "threads": 4, "reuse_port": True}
    proxy = start_proxy(config)
    sessions = [requests.Session() for _ in range(40)]
    try:
        for session in sessions:
            assert session.get(proxy.url + "/", timeout=10).status_code == 200
        pids = proxy.worker_pids()
        listening = _sockets_per_worker(pids, proxy.port, "0A")
        assert all(len(s) == 1 for s in listening) and len(set.union(*listening)) == 2
        counts = [len(s) for s in _sockets_per_worker(pids, proxy.port, "01")]
        assert sum(counts) == 40, counts
        assert min(counts) >= 8, f"connections per worker: {counts}"
    finally:
        for session in sessions:
            session.close()


# -- bodies moved socket to socket ------------------------------------------------


class Untouchable:
    """A body that must not be iterated: it went by splice_to."""

    closed = False

    def __iter__(self) -> Any:
        raise AssertionError("iterated")

    def close(self) -> None:
        self.closed = True


def splice_exchange(
    headers: list[tuple[str, str]], body: Any, *, is_ssl: bool = False
) -> tuple[bytes, Any]:
    """Serve *body* (a _Spliceable) on a real socket pair; returns what the client got."""
    import socket

    from gunicorn import http
    from gunicorn.config import Config

    from authproxy.serve.gthread import Response

    cfg = Config()
    if is_ssl:
        cfg.set("certfile", "cert.pem")
        cfg.set("keyfile", "key.pem")
    client, server_side = socket.socketpair()
    with client, server_side:
        req = next(http.get_parser(cfg, Recorder(GET), ("127.0.0.1", 5000)))
        resp = Response(req, server_side, cfg)
        resp.start_response("200 OK", headers)
        resp.write_file(body)
        resp.close()
        server_side.shutdown(socket.SHUT_WR)
        received = b""
        while piece := client.recv(65536):
            received += piece
    return received, resp


def test_a_body_that_can_splice_goes_socket_to_socket() -> None:
    from authproxy.serve.gthread import _Spliceable

    def splice_to(sock: Any, length: int, head: bytes) -> Any:
        assert length == 10

        def moves() -> Any:
            sock.sendall(head + b"01234")
            yield 5
            sock.sendall(b"56789")
            yield 5

        return moves()

    received, resp = splice_exchange(
        [("Content-Length", "10")], _Spliceable(Untouchable(), splice_to)
    )
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nContent-Length: 10" in head
    assert body == b"0123456789" and resp.sent == 10


def never(sock: Any, length: int, head: bytes) -> Any:
    raise AssertionError("spliced")


def refuses(sock: Any, length: int, head: bytes) -> Any:
    raise ValueError("the client expects another length")


@pytest.mark.parametrize(
    ("headers", "is_ssl"),
    [
        ([], False),  # no length: chunked by the server, which only iteration frames
        ([("Content-Length", "5")], True),  # TLS to the client: bytes must be encrypted
    ],
)
def test_otherwise_the_body_is_iterated(headers: list[tuple[str, str]], is_ssl: bool) -> None:
    from authproxy.serve.gthread import _Spliceable

    received, _ = splice_exchange(headers, _Spliceable([b"hello"], never), is_ssl=is_ssl)
    body = received.partition(b"\r\n\r\n")[2]
    assert body == (b"5\r\nhello\r\n0\r\n\r\n" if not headers else b"hello")


def test_a_body_whose_length_the_head_does_not_announce_is_iterated() -> None:
    from authproxy.serve.gthread import _Spliceable

    received, _ = splice_exchange([("Content-Length", "5")], _Spliceable([b"hello"], refuses))
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 5" in head and body == b"hello"


def test_only_bodies_offering_splice_to_are_marked_and_closing_reaches_them() -> None:
    from gunicorn.http.wsgi import FileWrapper

    from authproxy.serve.gthread import _offering_splice

    class Offering(Untouchable):
        splice_to = staticmethod(never)

    class Declining(Untouchable):
        splice_to = None

    plain, declining, offering = [b"x"], Declining(), Offering()
    for body in (plain, declining):
        assert _offering_splice(lambda e, s, b=body: b)({}, None) is body
    marked = _offering_splice(lambda e, s: offering)({}, None)
    assert isinstance(marked, FileWrapper)  # what gunicorn hands to Response.sendfile
    marked.close()
    assert offering.closed


# -- pool threads taking up requests themselves ---------------------------------


def test_a_slow_request_hands_its_duty_to_a_spare_thread(upstream: Any, start_proxy: Any) -> None:
    """Two threads wait for requests; three slow ones in flight must not keep a
    fourth waiting: each hands its duty on, up to ``threads`` at once."""
    from concurrent.futures import ThreadPoolExecutor

    config = bearer_config(upstream)
    config["server"] = {"workers": 1, "threads": 4}
    proxy = start_proxy(config)
    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(requests.get, proxy.url + "/sleep/3", timeout=30) for _ in range(3)]
        wait_until(lambda: sum(s.target == "/sleep/3" for s in upstream.seen) == 3, 10)
        quick = requests.get(proxy.url + "/status/204", timeout=30)
        assert quick.status_code == 204
        assert not any(s.done() for s in slow), "the quick answer waited for a slow one"
        assert [s.result().text for s in slow] == ["slept"] * 3


def test_more_connections_than_threads_are_all_served(upstream: Any, start_proxy: Any) -> None:
    config = bearer_config(upstream)
    config["server"] = {"workers": 1, "threads": 2}
    proxy = start_proxy(config)
    sessions = [requests.Session() for _ in range(12)]
    try:
        for round_ in range(3):
            for n, session in enumerate(sessions):
                got = session.get(f"{proxy.url}/status/200?{round_}-{n}", timeout=10)
                assert got.status_code == 200
        wait_until(lambda: len(proxy.access_lines()) == 36, 10, "an access line per request")
    finally:
        for session in sessions:
            session.close()


@pytest.mark.parametrize("sends_a_request", [True, False])
def test_an_idle_connection_is_closed_after_the_keepalive(
    upstream: Any, start_proxy: Any, sends_a_request: bool
) -> None:
    import socket

    config = bearer_config(upstream)
    config["server"] = {"workers": 1, "threads": 2, "keepalive": 1}
    proxy = start_proxy(config)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        received = b""
        if sends_a_request:
            client.sendall(b"GET /status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
            while b"\r\n\r\n" not in received:
                received += client.recv(65536)
            assert received.startswith(b"HTTP/1.1 200 ")
            assert b"Connection: keep-alive" in received
        while piece := client.recv(65536):  # until the proxy closes it (or a timeout)
            received += piece
    assert requests.get(proxy.url + "/status/200", timeout=10).status_code == 200


def test_without_epoll_requests_are_dispatched_as_gunicorn_does(
    upstream: Any, start_proxy: Any, tmp_path: Any
) -> None:
    """macOS and the BSDs have no epoll: the worker falls back to gunicorn's dispatch."""
    (tmp_path / "sitecustomize.py").write_text(
        "import select, selectors\n"
        "del select.epoll\n"
        "selectors.DefaultSelector = selectors.PollSelector\n"
    )
    config = bearer_config(upstream)
    config["server"] = {"workers": 1, "threads": 2}
    proxy = start_proxy(config, env={"PYTHONPATH": str(tmp_path)})
    with requests.Session() as session:
        for n in range(3):
            assert session.get(f"{proxy.url}/status/200?{n}", timeout=10).status_code == 200
    (pid,) = proxy.worker_pids()
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed since the listing
            pass
    assert "anon_inode:[eventpoll]" not in fds
    assert "Error" not in proxy.logs()
