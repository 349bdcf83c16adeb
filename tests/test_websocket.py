"""WebSocket / Upgrade tunnelling: a real echo upstream, authproxy under real gunicorn,
a real WebSocket client (``websockets``) and raw sockets where framing matters."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import werkzeug.test
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from werkzeug.serving import make_server

from authproxy import Forwarder, InjectHeaders
from authproxy.context import refuse

from .live_support import (
    PATIENCE,
    LiveUpstream,
    live_config,
    make_tls,
    read_head,
    read_until_eof,
)
from .support import TOKEN, Proxy

WORKERS = ["authproxy", "gthread", "gevent"]


@pytest.fixture
def live() -> Iterator[LiveUpstream]:
    server = LiveUpstream().start()
    yield server
    server.stop()


def ws(proxy: Proxy, path: str, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("open_timeout", PATIENCE)
    kwargs.setdefault("compression", None)  # what is sent is what crosses the tunnel
    kwargs.setdefault("max_size", None)
    return connect(f"ws://127.0.0.1:{proxy.port}{path}", **kwargs)


#: The test upstream's own upgrade protocols (see live_support), relayed only when listed.
TEST_PROTOCOLS = ["websocket", "x-count", "x-early", "x-wanted"]


def upgrade_request(path: str, protocol: str, host: str = "proxy") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    ).encode()


def raw(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE)
    return sock


# -- frames both ways ---------------------------------------------------------------


@pytest.mark.parametrize("worker_class", WORKERS)
def test_text_and_binary_frames_both_ways(
    live: LiveUpstream, start_proxy: Callable[..., Proxy], worker_class: str
) -> None:
    proxy = start_proxy({**live_config(live, TOKEN), "server": {"worker_class": worker_class}})
    with ws(proxy, "/ws/echo?id=frames") as conn:
        conn.send("hello, upstream")
        assert conn.recv(timeout=PATIENCE) == "hello, upstream"
        conn.send(b"\x00\xffbinary\r\n")
        assert conn.recv(timeout=PATIENCE) == b"\x00\xffbinary\r\n"
        conn.send("ünïcode ✓")
        assert conn.recv(timeout=PATIENCE) == "ünïcode ✓"
    assert live.note("closed:frames").wait(PATIENCE)
    line = proxy.access_line("/ws/echo")
    assert line["status"] == 101
    assert line["tunnel_end"] == "closed"
    assert line["tunnel_bytes_in"] > 0 and line["tunnel_bytes_out"] > 0


def test_ten_mebibyte_message(live: LiveUpstream, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(live_config(live, TOKEN))
    message = os.urandom(10 * 1024 * 1024)
    with ws(proxy, "/ws/echo?id=big") as conn:
        conn.send(message)
        echoed = conn.recv(timeout=PATIENCE)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(message).digest()
    line = proxy.access_line("/ws/echo")
    assert line["tunnel_bytes_in"] > len(message)  # payload, masked, plus framing
    assert line["tunnel_bytes_out"] > len(message)


def test_fifty_concurrent_tunnels(live: LiveUpstream, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(live_config(live, TOKEN), threads=64)
    count = 50
    everyone_connected = threading.Barrier(count, timeout=PATIENCE)
    everyone_echoed = threading.Barrier(count, timeout=PATIENCE)  # every upstream end counted
    results: dict[int, Any] = {}

    def client(i: int) -> None:
        try:
            with ws(proxy, f"/ws/echo?id=c{i}") as conn:
                everyone_connected.wait()
                for n in range(3):
                    conn.send(f"client {i} message {n}")
                    assert conn.recv(timeout=PATIENCE) == f"client {i} message {n}"
                everyone_echoed.wait()
            results[i] = "ok"
        except BaseException as exc:  # reported below
            results[i] = repr(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PATIENCE * 2)
    assert results == {i: "ok" for i in range(count)}
    assert live.peak >= count  # all fifty tunnels were open at once


# -- closing -----------------------------------------------------------------------


def test_client_closing_closes_the_upstream(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN))
    with ws(proxy, "/ws/echo?id=leaver") as conn:
        conn.send("one")
        assert conn.recv(timeout=PATIENCE) == "one"
        conn.close()
        assert live.note("closed:leaver").wait(PATIENCE)
    line = proxy.access_line("/ws/echo")
    assert line["tunnel_end"] == "closed"
    # The worker is free for more.
    with ws(proxy, "/ws/echo?id=next") as again:
        again.send("two")
        assert again.recv(timeout=PATIENCE) == "two"


def test_client_vanishing_without_close_frame(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN))
    with ws(proxy, "/ws/echo?id=vanish") as conn:
        conn.send("one")
        assert conn.recv(timeout=PATIENCE) == "one"
        conn.socket.shutdown(socket.SHUT_RDWR)  # no close handshake: just gone
        assert live.note("closed:vanish").wait(PATIENCE)
    assert proxy.access_line("/ws/echo")["status"] == 101


def test_upstream_closing(live: LiveUpstream, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(live_config(live, TOKEN))
    with ws(proxy, "/ws/goodbye") as conn:
        assert conn.recv(timeout=PATIENCE) == "goodbye"
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=PATIENCE)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4000
    assert closed.value.rcvd.reason == "upstream is done"
    assert proxy.access_line("/ws/goodbye")["tunnel_end"] == "closed"


def test_half_close_from_the_client_reaches_the_upstream(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN, upgrades=TEST_PROTOCOLS))
    with raw(proxy) as sock:
        sock.sendall(upgrade_request("/raw/count", "x-count"))
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"\r\nupgrade: x-count" in head.lower()
        payload = os.urandom(300_000)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the upstream answers only once it sees EOF
        assert rest + read_until_eof(sock) == f"got {len(payload)}\n".encode()
    line = proxy.access_line("/raw/count")
    assert line["tunnel_bytes_in"] == len(payload)


def test_half_close_from_the_upstream_reaches_the_client(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN, upgrades=TEST_PROTOCOLS))
    with raw(proxy) as sock:
        sock.sendall(upgrade_request("/raw/early", "x-early"))
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        # Sent in the same packet as the 101, then the upstream half-closed.
        assert rest + read_until_eof(sock) == b"right away\n"
        sock.sendall(b"still talking after your EOF\n")  # this direction is still open
        sock.shutdown(socket.SHUT_WR)
        assert live.note("early-done").wait(PATIENCE)
    assert live.received["early"] == b"still talking after your EOF\n"


# -- refusals ------------------------------------------------------------------------


def test_refused_upgrade_is_relayed_and_the_connection_stays_http(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    """oauth2-proxy once kept tunnelling after a failed upgrade, so the next request
    on that connection reached the upstream without the injected header."""
    proxy = start_proxy(live_config(live, TOKEN))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=PATIENCE)
    conn.request(
        "GET",
        "/ws/refuse",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    first = conn.getresponse()
    assert first.status == 401
    assert first.read() == b"no websocket for you\n"
    assert first.getheader("WWW-Authenticate") == 'Bearer realm="upstream"'
    sock = conn.sock
    assert sock is not None, "the proxy closed the connection after the refusal"
    # The next request on the same connection, as plain bytes.
    conn.request("GET", "/after-refusal", headers={"Authorization": "Bearer forged"})
    second = conn.getresponse()
    assert second.read() == b"ok"
    assert conn.sock is sock, "the second request went over another connection"
    conn.close()
    after = live.requests_to("/after-refusal")
    assert len(after) == 1
    assert after[0].header("Authorization") == f"Bearer {TOKEN}"
    assert proxy.access_line("/ws/refuse")["status"] == 401


def test_websocket_client_sees_the_refusal(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN))
    with pytest.raises(InvalidStatus) as refused:
        ws(proxy, "/ws/refuse")
    assert refused.value.response.status_code == 401
    assert TOKEN.encode() not in refused.value.response.body


def test_an_upgrade_to_an_upstream_that_is_down_is_502_and_the_log_says_why(
    start_proxy: Callable[..., Proxy],
) -> None:
    with socket.socket() as holder:  # a port held, not listening: refused
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}/?key=s3cret"
        proxy = start_proxy({"upstream": {"url": url}})
        with raw(proxy) as sock:
            sock.sendall(upgrade_request("/ws/down", "websocket"))
            answer = http.client.HTTPResponse(sock)
            answer.begin()
            assert answer.status == 502
        log = proxy.logs(until="upgrade GET /ws/down: connection refused")
        assert "s3cret" not in log


def test_upgrade_to_another_protocol_than_asked_is_not_relayed(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN, upgrades=TEST_PROTOCOLS))
    with raw(proxy) as sock:
        sock.sendall(upgrade_request("/raw/wrong", "x-wanted"))
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 502
        assert b"never relayed" not in answer.read()


def test_identity_refused_means_no_upgrade_reaches_the_upstream(live: LiveUpstream) -> None:
    """A step in front of the forwarder refuses: the upstream sees nothing. Served
    by werkzeug's server (``werkzeug.socket``), so that path is covered too."""

    def gatekeeper(app: Any) -> Any:
        def check(environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("HTTP_X_TEST_IDENTITY") != "verified":
                return refuse(environ, start_response, 403, "no identity")
            return app(environ, start_response)

        return check

    forwarder = Forwarder(live.url)
    app = gatekeeper(InjectHeaders(forwarder, set={"Authorization": f"Bearer {TOKEN}"}))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"ws://127.0.0.1:{server.server_port}/ws/echo?id=identity"
    try:
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=PATIENCE)
        assert refused.value.response.status_code == 403
        assert live.requests_to("/ws/echo") == []
        with connect(
            url, open_timeout=PATIENCE, additional_headers={"X-Test-Identity": "verified"}
        ) as conn:
            conn.send("through werkzeug")
            assert conn.recv(timeout=PATIENCE) == "through werkzeug"
    finally:
        server.shutdown()
        server.server_close()
        forwarder.close()
    assert live.note("closed:identity").wait(PATIENCE)
    assert live.requests_to("/ws/echo")[0].header("Authorization") == f"Bearer {TOKEN}"


def upgrade_status(live: LiveUpstream, headers: dict[str, str]) -> int:
    """The status a bare Forwarder gives an upgrade under werkzeug's test client, which
    has no raw socket to give it."""
    forwarder = Forwarder(live.url)
    try:
        return werkzeug.test.Client(forwarder).get("/ws/echo", headers=headers).status_code
    finally:
        forwarder.close()


def test_without_a_raw_socket_the_upgrade_is_refused_cleanly(
    live: LiveUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"Connection": "keep-alive, Upgrade", "Upgrade": "websocket"}
    assert upgrade_status(live, headers) == 501
    assert live.seen == []
    assert any("no raw socket" in r.getMessage() for r in caplog.records)


def test_upgrades_switched_off_are_forwarded_without_the_upgrade(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN, websocket=False))
    with raw(proxy) as sock:
        sock.sendall(upgrade_request("/plain", "websocket"))
        head, _ = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = live.requests_to("/plain")[0]
    assert seen.header("Upgrade") is None
    assert seen.header("Authorization") == f"Bearer {TOKEN}"


# -- what the upstream sees ------------------------------------------------------------


def test_the_upgrade_request_carries_the_injected_header(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN))
    headers = {"Authorization": "Bearer forged-by-client", "X-Drop-Me": "1"}
    with ws(proxy, "/ws/echo?id=hdr", additional_headers=headers) as conn:
        conn.send("x")
        conn.recv(timeout=PATIENCE)
    seen = live.requests_to("/ws/echo")[0]
    assert seen.header("Authorization") == f"Bearer {TOKEN}"
    assert seen.header("Upgrade") == "websocket"
    assert "upgrade" in (seen.header("Connection") or "").lower()
    assert seen.header("Sec-WebSocket-Key")
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


def test_hop_by_hop_names_in_connection_are_not_forwarded(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN, upgrades=TEST_PROTOCOLS))
    with raw(proxy) as sock:
        sock.sendall(
            b"GET /raw/count HTTP/1.1\r\nHost: p\r\nConnection: Upgrade, Authorization, X-Hop\r\n"
            b"X-Hop: secret-hop\r\nUpgrade: x-count\r\n\r\n"
        )
        head, _ = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.shutdown(socket.SHUT_WR)
        read_until_eof(sock)
    seen = live.requests_to("/raw/count")[0]
    assert seen.header("X-Hop") is None
    assert seen.header("Authorization") == f"Bearer {TOKEN}"


# -- limits -----------------------------------------------------------------------------


def test_idle_tunnels_are_closed(live: LiveUpstream, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(live_config(live, TOKEN, websocket_idle_timeout=1.0))
    with ws(proxy, "/ws/echo?id=idle") as conn:
        conn.send("then silence")
        assert conn.recv(timeout=PATIENCE) == "then silence"
        with pytest.raises(ConnectionClosed):
            conn.recv(timeout=PATIENCE)
    assert proxy.access_line("/ws/echo")["tunnel_end"] == "idle"


def test_tunnels_end_at_their_maximum_lifetime(
    live: LiveUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(live_config(live, TOKEN, websocket_max_lifetime=2.0))
    with ws(proxy, "/ws/echo?id=old") as conn, pytest.raises(ConnectionClosed):
        for i in range(int(PATIENCE / 0.1)):  # busy the whole time
            conn.send(f"message {i}")
            conn.recv(timeout=PATIENCE)
            threading.Event().wait(0.1)
    assert proxy.access_line("/ws/echo")["tunnel_end"] == "lifetime"


def test_bad_limits_are_config_errors() -> None:
    with pytest.raises(ValueError, match="websocket_idle_timeout"):
        Forwarder("http://127.0.0.1:1", websocket_idle_timeout=-1)


# -- TLS ---------------------------------------------------------------------------------


def test_wss_behind_an_https_upstream_uses_the_forwarders_tls_settings(
    tmp_path: Path, start_proxy: Callable[..., Proxy]
) -> None:
    tls = make_tls(tmp_path)
    live = LiveUpstream(tls=tls.server).start()
    try:
        trusting = start_proxy(live_config(live, TOKEN, tls_verify=str(tls.ca)))
        with ws(trusting, "/ws/echo?id=tls") as conn:
            conn.send("over tls")
            assert conn.recv(timeout=PATIENCE) == "over tls"
            big = os.urandom(2 * 1024 * 1024)
            conn.send(big)
            assert conn.recv(timeout=PATIENCE) == big
        assert live.note("closed:tls").wait(PATIENCE)
        assert live.requests_to("/ws/echo")[0].header("Authorization") == f"Bearer {TOKEN}"
        # The same upstream, not trusted: no tunnel, and no request reaches it.
        before = len(live.seen)
        strict = start_proxy(live_config(live, TOKEN))
        with pytest.raises(InvalidStatus) as refused:
            ws(strict, "/ws/echo?id=untrusted")
        assert refused.value.response.status_code == 502
        assert len(live.seen) == before
    finally:
        live.stop()


@pytest.mark.parametrize("upgrade", ["web\x7fsocket", "h2c", "foo", "SPDY/3.1"])
def test_an_upgrade_not_listed_goes_on_as_plain_http(live: LiveUpstream, upgrade: str) -> None:
    forwarder = Forwarder(live.url)
    try:
        response = werkzeug.test.Client(forwarder).get(
            "/ws/echo", headers={"Connection": "Upgrade", "Upgrade": upgrade}
        )
    finally:
        forwarder.close()
    assert response.status_code != 101
    seen = live.requests_to("/ws/echo")[0]
    assert seen.header("Upgrade") is None
    assert "upgrade" not in (seen.header("Connection") or "").lower()


def test_combined_access_log_line_of_a_tunnel(caplog: pytest.LogCaptureFixture) -> None:
    from authproxy import AccessLog

    def tunnel_like(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("101 Switching Protocols", [])
        environ.update(
            {
                "authproxy.tunnel_bytes_in": 5,
                "authproxy.tunnel_bytes_out": 7,
                "authproxy.tunnel_end": "idle",
            }
        )
        return []

    app = AccessLog(tunnel_like, format="combined")
    werkzeug.test.Client(app).get("/ws", buffered=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "authproxy.access"]
    assert len(lines) == 1
    assert '"GET /ws HTTP/1.1" 101 0' in lines[0]
    assert lines[0].endswith(" tunnel 5 7 idle")


# -- behind the real identity step -----------------------------------------------------


def test_identity_gates_the_upgrade(live: LiveUpstream, start_proxy: Callable[..., Proxy]) -> None:
    """No valid Access token: refused before anything reaches the upstream. A valid
    one: the tunnel opens, and the upgrade request carries the injected credential."""
    from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims

    key = SigningKey("RSA")
    with JwksServer([key]) as jwks:
        config = live_config(live, TOKEN)
        identity = {
            "use": "identity",
            "team_domain": TEAM_DOMAIN,
            "audience": [AUDIENCE],
            "certs_url": jwks.url,
        }
        config["pipeline"].insert(1, identity)
        proxy = start_proxy(config)
        with pytest.raises(InvalidStatus) as refused:
            ws(proxy, "/ws/echo?id=anonymous")
        assert refused.value.response.status_code == 401
        other = SigningKey("RSA")  # signed, but not by a key Access publishes
        with pytest.raises(InvalidStatus) as forged:
            ws(
                proxy,
                "/ws/echo?id=forged",
                additional_headers={"Cf-Access-Jwt-Assertion": other.sign(claims())},
            )
        assert forged.value.response.status_code == 403
        assert live.requests_to("/ws/echo") == []
        token = key.sign(claims(email="ana@example.com"))
        with ws(
            proxy, "/ws/echo?id=verified", additional_headers={"Cf-Access-Jwt-Assertion": token}
        ) as conn:
            conn.send("who am I")
            assert conn.recv(timeout=PATIENCE) == "who am I"
        (upgrade,) = live.requests_to("/ws/echo")
        assert upgrade.header("Authorization") == f"Bearer {TOKEN}"
        assert upgrade.header("X-Auth-Request-Email") == "ana@example.com"
        assert live.note("closed:verified").wait(PATIENCE)
        lines = proxy.access_lines(count=3, timeout=PATIENCE)
        assert [(r["status"], r["identity"]) for r in lines] == [
            (401, None),
            (403, None),
            (101, "ana@example.com"),
        ]
