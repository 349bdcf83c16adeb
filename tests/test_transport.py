"""The transport on real socket pairs: a counted body moved socket to socket in
the kernel (Response.splice_to), and the idle connections kept between requests."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from authproxy.errors import UpstreamProtocolError, UpstreamTimeout
from authproxy.upstream.transport import IdleConnections, Response

needs_splice = pytest.mark.skipif(not hasattr(os, "splice"), reason="needs os.splice (Linux)")

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"


class Conn:
    """What the transport needs of a urllib3 connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class Pool:
    def __init__(self) -> None:
        self.returned: list[Conn] = []

    def put(self, conn: Conn) -> None:
        self.returned.append(conn)


class Pair:
    """upstream -> proxy socket (read by the Response); proxy -> client socket."""

    def __init__(self) -> None:
        self.upstream, proxy_in = socket.socketpair()
        proxy_out, self.client = socket.socketpair()
        self.client.settimeout(10)  # a test waiting for bytes that never come fails
        self.conn = Conn(proxy_in)
        self.proxy_out = proxy_out
        self.pool = Pool()

    def response(self, read_timeout: float = 5.0) -> Response:
        response = Response(self.conn, self.pool, False, 65536, read_timeout)
        response.read_head()
        return response

    def receive(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = self.client.recv(n - len(data))
            assert piece, "the client side ended early"
            data += piece
        return data

    def close(self) -> None:
        for sock in (self.upstream, self.conn.sock, self.proxy_out, self.client):
            sock.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def send_later(sock: socket.socket, data: bytes, delay: float = 0.0) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        sock.sendall(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@needs_splice
def test_a_large_body_arrives_whole_and_the_connection_goes_back(pair: Pair) -> None:
    body = os.urandom(3 << 20)  # several moves of the 1 MiB pipe
    pair.upstream.sendall(HEAD % len(body) + body[:1000])  # some of it behind the head
    response = pair.response()
    assert response.can_splice()
    sender = send_later(pair.upstream, body[1000:])
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pair.receive(len(body))))
    reader.start()
    moves = list(response.splice_to(pair.proxy_out, len(body)))
    reader.join(10)
    sender.join(10)
    assert moves[0] == 1000 and sum(moves) == len(body)
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(body).digest()
    assert response.complete and pair.pool.returned == [pair.conn] and not pair.conn.closed
    # Back in blocking mode for the next request on the connection.
    assert pair.conn.sock.getblocking()


@needs_splice
def test_each_piece_goes_on_before_the_upstream_sends_the_next(pair: Pair) -> None:
    waits: list[int] = []
    pair.upstream.sendall(HEAD % 200_000)
    response = pair.response()
    response.before_read = lambda: waits.append(1)
    moves = response.splice_to(pair.proxy_out, 200_000)
    pair.upstream.sendall(b"a" * 100_000)
    time.sleep(0.05)
    # A move that waited for more than was there would return only when this
    # ends the upstream's side.
    watchdog = threading.Timer(3.0, pair.upstream.shutdown, args=(socket.SHUT_WR,))
    watchdog.start()
    started = time.monotonic()
    first = next(moves)
    assert time.monotonic() - started < 2.0
    watchdog.cancel()
    assert first == 100_000  # all that was there, in one move, no wait
    assert waits == []
    assert pair.receive(100_000) == b"a" * 100_000
    send_later(pair.upstream, b"b" * 100_000, delay=0.2)
    moved = 0
    while moved < 100_000:
        moved += next(moves)
    assert waits  # the quiet upstream was waited for through before_read
    assert pair.receive(100_000) == b"b" * 100_000
    assert list(moves) == []


@pytest.mark.parametrize("behind_the_head", [0, 1000])
@needs_splice
def test_the_servers_head_goes_out_first(pair: Pair, behind_the_head: int) -> None:
    body = os.urandom(300_000)
    pair.upstream.sendall(HEAD % len(body) + body[:behind_the_head])
    response = pair.response()
    send_later(pair.upstream, body[behind_the_head:], delay=0.05)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n"
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pair.receive(len(head + body))))
    reader.start()
    moves = list(response.splice_to(pair.proxy_out, len(body), head))
    reader.join(10)
    assert sum(moves) == len(body)  # body bytes only: the head is not counted
    assert received == [head + body]


@needs_splice
def test_a_pipe_is_kept_only_when_its_splice_left_it_empty() -> None:
    from authproxy.upstream.transport import _PIPES

    def splice_once(fail: bool) -> None:
        pair = Pair()
        try:
            pair.upstream.sendall(HEAD % 100_000 + b"x" * 10)
            moves = pair.response().splice_to(pair.proxy_out, 100_000)
            assert next(moves) == 10
            pair.upstream.sendall(b"y" * 50_000)
            if fail:
                pair.client.close()  # the next move into the client fails
                with pytest.raises(OSError):
                    for _ in moves:
                        pass
            else:
                pair.upstream.sendall(b"y" * 49_990)
                assert sum(moves) == 100_000 - 10
                assert pair.receive(100_000) == b"x" * 10 + b"y" * 99_990
        finally:
            pair.close()

    splice_once(fail=False)
    kept = _PIPES._idle[-1]
    splice_once(fail=False)
    assert _PIPES._idle[-1] == kept  # taken and given back: the same pipe
    splice_once(fail=True)  # it may hold bytes of that body now: closed, not kept
    assert kept not in _PIPES._idle
    with pytest.raises(OSError):
        os.fstat(kept[0])


@needs_splice
def test_an_upstream_that_hangs_up_mid_body_is_an_upstream_error(pair: Pair) -> None:
    pair.upstream.sendall(HEAD % 100_000 + b"x" * 10)
    response = pair.response()
    pair.upstream.sendall(b"y" * 5000)
    pair.upstream.close()
    with pytest.raises(UpstreamProtocolError, match="mid-body"):
        for _ in response.splice_to(pair.proxy_out, 100_000):
            pass
    assert pair.conn.closed and pair.pool.returned == [pair.conn]
    assert pair.receive(5010) == b"x" * 10 + b"y" * 5000


@needs_splice
def test_a_silent_upstream_times_out(pair: Pair) -> None:
    pair.upstream.sendall(HEAD % 100_000)
    response = pair.response(read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        for _ in response.splice_to(pair.proxy_out, 100_000):
            pass
    assert 0.25 < time.monotonic() - started < 5
    assert pair.conn.closed


@needs_splice
def test_the_timeout_is_between_bytes_not_for_the_whole_body(pair: Pair) -> None:
    """A slow but steady upstream is not cut off: each move restarts the clock."""
    pair.upstream.sendall(HEAD % 10_000)
    response = pair.response(read_timeout=2.0)

    def trickle() -> None:
        for _ in range(10):
            time.sleep(0.3)
            pair.upstream.sendall(b"z" * 1000)

    threading.Thread(target=trickle, daemon=True).start()
    assert sum(response.splice_to(pair.proxy_out, 10_000)) == 10_000  # 3 s in all
    assert pair.receive(10_000) == b"z" * 10_000


@needs_splice
def test_a_length_other_than_the_bodys_is_refused_before_anything_moves(pair: Pair) -> None:
    """The client was told another length (a step rewrote Content-Length): no splice."""
    pair.upstream.sendall(HEAD % 100_000 + b"x" * 10)
    response = pair.response()
    with pytest.raises(ValueError):
        response.splice_to(pair.proxy_out, 5)
    assert response.take() == b"x" * 10  # nothing was taken or sent
    response.close()


@needs_splice
def test_an_error_from_before_read_passes_through(pair: Pair) -> None:
    class Gone(Exception):
        pass

    def client_left() -> None:
        raise Gone

    pair.upstream.sendall(HEAD % 100_000)
    response = pair.response()
    response.before_read = client_left
    with pytest.raises(Gone):
        next(response.splice_to(pair.proxy_out, 100_000))
    response.close()
    assert pair.conn.closed


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",  # no length
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",  # already complete
    ],
)
@needs_splice
def test_only_an_unfinished_counted_body_can_be_spliced(pair: Pair, answer: bytes) -> None:
    pair.upstream.sendall(answer)
    assert not pair.response().can_splice()


@needs_splice
def test_a_tls_socket_is_never_spliced(pair: Pair) -> None:
    class Wrapped(socket.socket):  # stands for ssl.SSLSocket: not the plain socket class
        pass

    pair.upstream.sendall(HEAD % 100_000)
    response = pair.response()
    response._sock = Wrapped(fileno=os.dup(pair.conn.sock.fileno()))
    try:
        assert not response.can_splice()
    finally:
        response._sock.close()


# -- idle connections ------------------------------------------------------------


class Opener:
    """Stands for urllib3's pool: makes connections on socket pairs."""

    def __init__(self) -> None:
        self.made: list[Conn] = []
        self.peers: list[socket.socket] = []

    def _new_conn(self) -> Conn:
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        conn = Conn(ours)
        self.made.append(conn)
        return conn


def test_idle_connections_are_reused_newest_first_and_capped() -> None:
    opener = Opener()
    idle = IdleConnections(opener, maxsize=2)
    a, b, c = idle.get(), idle.get(), idle.get()
    assert opener.made == [a, b, c]  # none idle yet: three new ones
    for conn in (a, b, c):
        idle.put(conn)
    assert len(idle) == 2 and c.closed and not (a.closed or b.closed)  # over the cap: closed
    assert idle.get() is b and idle.get() is a
    idle.put(a)
    idle.close()
    assert a.closed and len(idle) == 0
    for peer in opener.peers:
        peer.close()


def test_an_idle_connection_the_upstream_closed_is_not_used_as_is() -> None:
    opener = Opener()
    idle = IdleConnections(opener, maxsize=4)
    conn = idle.get()
    idle.put(conn)
    opener.peers[0].close()  # the upstream hung up while it was idle
    again = idle.get()
    assert again is conn and conn.closed  # closed, to be connected afresh by the exchange
    for peer in opener.peers:
        peer.close()


def test_a_body_that_broke_off_never_closes_its_connection_again(pair: Pair) -> None:
    """The connection of a failed body goes back to the pool at once and may carry
    the next request on a new socket; closing the old response must leave it be."""
    pair.upstream.sendall(HEAD % 100 + b"x" * 10)
    pair.upstream.shutdown(socket.SHUT_WR)
    response = pair.response()
    with pytest.raises(UpstreamProtocolError):
        for _ in response:
            pass
    assert pair.pool.returned == [pair.conn]
    # The pool hands the connection to another request, which connects it anew.
    fresh, peer = socket.socketpair()
    with peer:
        pair.conn.sock, pair.conn.closed = fresh, False
        response.close()  # what the server does with the failed body
        assert not pair.conn.closed
        fresh.sendall(b"still mine")
        assert peer.recv(100) == b"still mine"
