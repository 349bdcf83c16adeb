"""The forwarder on its own: path rules, construction errors, and a werkzeug test
client around it with the real recording upstream behind."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.test import Client, EnvironBuilder

from authproxy.errors import ConfigError
from authproxy.upstream.forwarder import (
    UPSTREAM_MS_KEY,
    UPSTREAM_URL_KEY,
    Forwarder,
    join_path,
    request_target,
)

from .support import TOKEN, Upstream, free_port, one_answer_upstream


@pytest.mark.parametrize(
    ("base", "target", "joined"),
    [
        # Go's singleJoiningSlash: exactly one slash where the two meet.
        ("", "/x", "/x"),
        ("/", "/x", "/x"),
        ("/api", "/v1", "/api/v1"),
        ("/api/", "/v1", "/api/v1"),
        ("/api", "v1", "/api/v1"),
        ("/api/", "v1", "/api/v1"),
        ("/api/", "/", "/api/"),
        ("/api", "/", "/api/"),
        ("/api", "/v1?next=/x/", "/api/v1?next=/x/"),
        ("/api/", "//x", "/api//x"),
    ],
)
def test_join_path(base: str, target: str, joined: str) -> None:
    assert join_path(base, target) == joined


def environ(**values: Any) -> dict[str, Any]:
    return values


@pytest.mark.parametrize(
    ("env", "target"),
    [
        (environ(RAW_URI="/a%2Fb?q=%7e", PATH_INFO="/a/b"), "/a%2Fb?q=%7e"),
        (environ(REQUEST_URI="/x%2f%zz", PATH_INFO="/x/%zz"), "/x%2f%zz"),
        (environ(RAW_URI="/raw", REQUEST_URI="/other"), "/raw"),
        (environ(RAW_URI="http://other.host/p?q=1"), "/p?q=1"),
        (environ(RAW_URI="HTTPS://other.host:8443/p"), "/p"),
        (environ(RAW_URI="http://other.host"), "/"),
        (environ(RAW_URI="http://other.host?q=1"), "/?q=1"),
        (environ(RAW_URI="http://other.host?q=/x"), "/?q=/x"),
        (environ(RAW_URI="http://user:pw@other.host/p"), "/p"),
        (environ(RAW_URI="*"), None),
        (environ(RAW_URI="other.host:443"), None),
        (environ(RAW_URI="ftp://other.host/p"), None),
        # No raw target (a server that gives none): rebuilt from the decoded parts.
        (environ(PATH_INFO="/a b", QUERY_STRING="x=1"), "/a%20b?x=1"),
        (environ(SCRIPT_NAME="/app", PATH_INFO="/x"), "/app/x"),
        (environ(PATH_INFO=""), "/"),
        # PATH_INFO is bytes as latin-1 (PEP 3333): UTF-8 "é" is two characters here.
        (environ(PATH_INFO="/caf\xc3\xa9"), "/caf%C3%A9"),
        (environ(PATH_INFO="/100%"), "/100%25"),
    ],
)
def test_request_target(env: dict[str, Any], target: str | None) -> None:
    assert request_target(env) == target


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"url": "ftp://host/"}, "upstream.url"),
        ({"url": "host:8080"}, "upstream.url"),
        ({"url": "http:///nohost"}, "upstream.url"),
        ({"url": "http://user:pw@host/"}, "upstream.url"),
        ({"url": "http://host/#frag"}, "upstream.url"),
        ({"url": "http://host", "connect_timeout": 0}, "upstream.connect_timeout"),
        ({"url": "http://host", "read_timeout": -1}, "upstream.read_timeout"),
        ({"url": "http://host", "pool_size": 0}, "upstream.pool_size"),
    ],
)
def test_bad_options_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        Forwarder(**kwargs)
    assert err.value.key == key
    assert "pw" not in str(err.value)


@pytest.fixture
def forwarder(upstream: Upstream) -> Iterator[Forwarder]:
    app = Forwarder(upstream.url, read_timeout=2.0)
    yield app
    app.close()


def test_forwards_method_body_and_headers(forwarder: Forwarder, upstream: Upstream) -> None:
    response = Client(forwarder).post(
        "/submit?x=1",
        data=b"payload",
        headers={"X-Custom": "1", "Content-Type": "text/plain"},
    )
    assert response.status_code == 200
    seen = upstream.last()
    assert (seen.method, seen.target, seen.body_len) == ("POST", "/submit?x=1", 7)
    assert seen.header("X-Custom") == "1"
    assert seen.header("Content-Type") == "text/plain"
    assert seen.header("Content-Length") == "7"
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"


def test_records_upstream_url_and_time(forwarder: Forwarder, upstream: Upstream) -> None:
    env = EnvironBuilder(path="/").get_environ()
    captured: list[str] = []
    body = forwarder(env, lambda status, headers, exc_info=None: captured.append(status))
    assert b"".join(body) == b"ok"
    assert captured == ["200 OK"]
    assert env[UPSTREAM_URL_KEY] == upstream.url
    assert isinstance(env[UPSTREAM_MS_KEY], float) and env[UPSTREAM_MS_KEY] >= 0


def test_response_headers_keep_repeats_and_drop_hop_by_hop(forwarder: Forwarder) -> None:
    cookies = Client(forwarder, use_cookies=False).get("/cookies")
    assert cookies.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2, c=3"]
    hop = Client(forwarder).get("/hop")
    assert "X-Secret-Hop" not in hop.headers
    assert "Keep-Alive" not in hop.headers
    assert "Connection" not in hop.headers


def test_redirect_body_is_relayed(forwarder: Forwarder) -> None:
    response = Client(forwarder).get("/redirect")
    assert (response.status_code, response.data) == (302, b"go away\r\n")


def test_streamed_body_is_read_in_pieces(forwarder: Forwarder) -> None:
    env = EnvironBuilder(path="/bytes/1000000").get_environ()
    body = forwarder(env, lambda *args: None)
    pieces = list(body)
    getattr(body, "close", lambda: None)()
    assert sum(map(len, pieces)) == 1000000
    assert len(pieces) > 1
    assert max(map(len, pieces)) <= forwarder.chunk_size


def test_chunked_body_needs_a_server_that_terminates_it(
    forwarder: Forwarder, upstream: Upstream
) -> None:
    builder = EnvironBuilder(path="/up", method="POST", input_stream=io.BytesIO(b"abc"))
    env = builder.get_environ()
    env.pop("CONTENT_LENGTH", None)
    env["HTTP_TRANSFER_ENCODING"] = "chunked"
    env["wsgi.input_terminated"] = False
    statuses: list[str] = []
    forwarder(env, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == ["411 Length Required"]
    assert upstream.seen == []

    env = builder.get_environ()
    env.pop("CONTENT_LENGTH", None)
    env["HTTP_TRANSFER_ENCODING"] = "chunked"
    env["wsgi.input_terminated"] = True
    body = forwarder(env, lambda status, headers, exc_info=None: statuses.append(status))
    assert b"".join(body) == b"ok"
    assert upstream.last().header("Transfer-Encoding") == "chunked"
    assert upstream.last().body_len == 3


def test_bad_content_length_is_400(forwarder: Forwarder, upstream: Upstream) -> None:
    env = EnvironBuilder(path="/", method="POST", data=b"abc").get_environ()
    env["CONTENT_LENGTH"] = "3x"
    statuses: list[str] = []
    forwarder(env, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == ["400 Bad Request"]
    assert upstream.seen == []


def test_asterisk_target_is_400(forwarder: Forwarder, upstream: Upstream) -> None:
    env = EnvironBuilder(path="/", method="OPTIONS").get_environ()
    env["RAW_URI"] = "*"
    statuses: list[str] = []
    forwarder(env, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == ["400 Bad Request"]
    assert upstream.seen == []


def test_refused_connection_is_502() -> None:
    app = Forwarder(f"http://127.0.0.1:{free_port()}")
    response = Client(app).get("/")
    assert (response.status_code, response.data) == (502, b"Bad Gateway\n")


def test_read_timeout_is_504(upstream: Upstream) -> None:
    app = Forwarder(upstream.url, read_timeout=0.5)
    response = Client(app).get("/sleep/3")
    assert (response.status_code, response.data) == (504, b"Gateway Timeout\n")


def test_read_timeout_holds_on_a_kept_alive_connection() -> None:
    """The timeout set when a connection opens still bounds its later requests.

    The upstream answers the first request on its one connection, then
    reads the second and never answers it.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        received = b""
        while received.count(b"\r\n\r\n") < 2:
            data = conn.recv(65536)
            if not data:
                return
            received += data
            if received.count(b"\r\n\r\n") == 1 and not received.endswith(b"answered"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                received += b"answered"

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = Client(
            Forwarder(f"http://127.0.0.1:{listener.getsockname()[1]}", read_timeout=2.0)
        )
        assert client.get("/first").data == b"ok"
        answers: list[Any] = []
        asking = threading.Thread(target=lambda: answers.append(client.get("/second")))
        asking.start()
        asking.join(timeout=10)
        assert answers, "the second request was still waiting after 10 s"
        assert (answers[0].status_code, answers[0].data) == (504, b"Gateway Timeout\n")
        assert len(accepted) == 1  # both went over the kept-alive connection
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
        thread.join(timeout=5)


def test_connect_timeout_is_504() -> None:
    """A listener whose accept queue is full drops new SYNs: connecting times out."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        app = Forwarder(f"http://127.0.0.1:{port}", connect_timeout=0.5)
        response = Client(app).get("/")
        assert (response.status_code, response.data) == (504, b"Gateway Timeout\n")
    finally:
        for s in (*fillers, listener):
            s.close()


def test_failure_log_names_no_query_or_secret(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    app = Forwarder(upstream.url, read_timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="authproxy.forwarder"):
        response = Client(app).get(
            "/sleep/3?access_token=abc123", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert response.status_code == 504
    messages = [r.getMessage() for r in caplog.records if r.name == "authproxy.forwarder"]
    assert any("/sleep/3" in m and "timed out waiting for the answer" in m for m in messages)
    assert not any("abc123" in m or TOKEN in m for m in messages)


def test_failure_log_names_no_query_of_the_upstream_url(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as holder:  # bound, not listening: refused
        holder.bind(("127.0.0.1", 0))
        app = Forwarder(f"http://127.0.0.1:{holder.getsockname()[1]}/base?key=s3cret")
        with caplog.at_level(logging.WARNING, logger="authproxy.forwarder"):
            assert Client(app).get("/x").status_code == 502
    messages = [r.getMessage() for r in caplog.records if r.name == "authproxy.forwarder"]
    assert any("/base failed: GET /base/x" in m for m in messages), messages
    assert not any("s3cret" in m for m in messages)


def test_readiness_is_cached() -> None:
    # A port held by a socket that is bound but not yet listening: refused,
    # and no other server can take it while the test runs.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        app = Forwarder(f"http://127.0.0.1:{holder.getsockname()[1]}")
        assert app.check_ready(cache_seconds=0) is False
        holder.listen()
        assert app.check_ready(cache_seconds=3600) is False  # the cached answer
        assert app.check_ready(cache_seconds=0) is True


def test_impersonation_headers(upstream: Upstream) -> None:
    headers = {"Impersonate-User": "admin", "Impersonate-Extra-Scopes": "x"}
    Client(Forwarder(upstream.url)).get("/", headers=headers)
    assert not upstream.last().header_names() & {"impersonate-user", "impersonate-extra-scopes"}
    Client(Forwarder(upstream.url, strip_impersonation=False)).get("/", headers=headers)
    assert upstream.last().header("Impersonate-User") == "admin"


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    ],
)
def test_broken_upstream_answers_are_502(answer: bytes) -> None:
    """Closing without an answer, a non-HTTP answer, a malformed length: a generic 502."""
    listener, thread = one_answer_upstream(answer)
    try:
        port = listener.getsockname()[1]
        response = Client(Forwarder(f"http://127.0.0.1:{port}")).get("/")
        assert (response.status_code, response.data) == (502, b"Bad Gateway\n")
    finally:
        thread.join(10)
        listener.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    ],
)
def test_ambiguous_framing_is_a_502(answer: bytes) -> None:
    # RFC 9112 6.3: repeated lengths MAY be rejected, and a length beside
    # Transfer-Encoding "ought to be handled as an error" (smuggling): both are.
    listener, thread = one_answer_upstream(answer)
    try:
        port = listener.getsockname()[1]
        response = Client(Forwarder(f"http://127.0.0.1:{port}")).get("/")
        assert (response.status_code, response.get_data()) == (502, b"Bad Gateway\n")
    finally:
        thread.join(10)
        listener.close()


def _streamed_response(sock: socket.socket, waits: list[int]) -> Any:
    from types import SimpleNamespace

    from authproxy.upstream.transport import Response

    response = Response(SimpleNamespace(sock=sock), None, False, 65536)
    response.read_head()
    response.before_read = lambda: waits.append(1)
    return response


def test_a_streamed_body_waits_through_before_read_only_when_it_must() -> None:
    """Bytes already there are read at once; before_read (the selector that also
    watches the client) runs only for a read that would block."""
    upstream, proxy_side = socket.socketpair()
    try:
        upstream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        waits: list[int] = []
        response = _streamed_response(proxy_side, waits)
        body = iter(response)
        upstream.sendall(b"12345")
        time.sleep(0.05)
        assert next(body) == b"12345" and waits == []  # it was there: no wait
        threading.Timer(0.2, upstream.sendall, args=(b"67890",)).start()
        assert next(body) == b"67890" and waits == [1]  # it was not: one wait
    finally:
        upstream.close()
        proxy_side.close()
