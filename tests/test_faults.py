"""Faults, each with a test: a broken upstream, a broken key endpoint, a vanishing
token file, SIGTERM under load and a worker killed mid-request.

Everything runs for real: ``authproxy serve`` under gunicorn, a scripted upstream
on raw sockets (:mod:`tests.scripted`) that can send any bytes at any pace, the
key server of :mod:`tests.jwks`. A fault must end in a clear status (502/504,
or 401/403 for identity) or, once a body is under way, in an aborted client
connection, never in a 500, a traceback or the token on the wrong side.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from .conftest import identity_config
from .jwks import CERTS_PATH, JwksServer, SigningKey, certs_document, claims
from .scripted import Request, ScriptedUpstream, reset
from .support import (
    TOKEN,
    Proxy,
    RawResponse,
    Upstream,
    free_port,
    raw_request,
    rss_kib,
    wait_until,
)

StartProxy = Callable[..., Proxy]
BEARER = f"Bearer {TOKEN}"
JWT_HEADER = "Cf-Access-Jwt-Assertion"
GIB = 1 << 30


def no_token(response: RawResponse | requests.Response) -> None:
    if isinstance(response, RawResponse):
        headers, body = response.headers, response.body
    else:
        headers, body = list(response.headers.items()), response.content
    assert all(TOKEN not in name + value for name, value in headers)
    assert TOKEN.encode() not in body


def get_raw(proxy: Proxy, path: str, timeout: float = 30) -> RawResponse:
    request = f"GET {path} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
    response = raw_request(proxy.port, request.encode(), timeout=timeout)
    no_token(response)
    return response


def read_all_raw(proxy: Proxy, path: str, limit: int = 64 << 20) -> tuple[bytes, bytes]:
    """The head and as much body as arrives (at most *limit*) before the proxy hangs up."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < limit:
            try:
                piece = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    assert TOKEN.encode() not in data
    return head, body


# -- a hostile upstream: one scripted server, one proxy, a path per misbehaviour ----------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

#: Answers that are not HTTP, or not HTTP a proxy may relay: each is a 502.
MALFORMED: dict[str, bytes] = {
    "not http at all": b"SSH-2.0-OpenSSH_9.6\r\n",
    "http/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "status below 100": b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
    "four-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "header without a colon": b"HTTP/1.1 200 OK\r\nX-Broken\r\nContent-Length: 2\r\n\r\nok",
    "NUL in a header value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "bare CR in a header value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "obsolete line folding": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "space before the colon": b"HTTP/1.1 200 OK\r\nX-A : a\r\nContent-Length: 2\r\n\r\nok",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "length overflow": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "closed before answering": b"",
    "closed mid-head": b"HTTP/1.1 200 OK\r\nContent-Le",
}


def _hostile(conn: socket.socket, request: Request) -> bool:
    """Dispatch on the first path segment; True keeps the connection open."""
    path = request.target.partition("?")[0]
    name = path.split("/")[2] if path.startswith("/malformed/") else path.strip("/")
    if path.startswith("/malformed/"):
        conn.sendall(MALFORMED[_unslug(name)])
        return False
    if name == "ok":
        conn.sendall(OK)
        return True
    if name == "reset-before-answer":
        reset(conn)
        return False
    if name == "control-chars-in-reason":
        conn.sendall(b"HTTP/1.1 200 O\x01K\x7f\r\nContent-Length: 2\r\n\r\nok")
        return True
    if name == "endless-headers":
        _send_endless_headers(conn, request)
        return False
    if name == "endless-interim":
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        _send_endless(conn, request, interim, interim)
        return False
    if name.startswith("reset-mid-body-"):
        kind = name.removeprefix("reset-mid-body-")
        conn.sendall(_partial_body(kind))
        reset(conn)
        return False
    if name.startswith("stall-mid-body-"):
        conn.sendall(_partial_body(name.removeprefix("stall-mid-body-")))
        hold.wait(60)
        return False
    if name == "huge-length":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 * GIB))
        block = b"h" * 65536
        for _ in range(16):  # 1 MiB of the promised 100 GiB, then hang up
            conn.sendall(block)
        return False
    if name == "unsolicited":
        # A complete answer, then, once the proxy has parked the connection,
        # a second "response" nobody asked for.
        conn.sendall(OK)
        time.sleep(0.5)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
        pushed.set()
        return True
    raise AssertionError(f"no script for {path}")


hold = threading.Event()  # released when the module is done
pushed = threading.Event()  # the unsolicited bytes are out


def _slug(name: str) -> str:
    return name.replace(" ", "-").replace("/", "_")


def _unslug(slug: str) -> str:
    return {_slug(name): name for name in MALFORMED}[slug]


def _partial_body(kind: str) -> bytes:
    if kind == "big":  # 1 MiB promised: relayed as a stream
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"b" * 100_000
    if kind == "small":  # small enough to be read whole before answering
        return b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + b"s" * 100
    if kind == "chunked":
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b"186a0\r\n" + b"c" * 50_000  # half of a 100000-byte chunk
    raise AssertionError(kind)


#: How much the endless scripts got out before the proxy hung up (bytes).
endless_sent: dict[str, int] = {}


def _send_endless(conn: socket.socket, request: Request, first: bytes, line: bytes) -> None:
    sent = 0
    try:
        conn.sendall(first)
        block = line * max(1, 65536 // len(line))
        while sent < 64 << 20:  # bounded: 64 MiB at most
            conn.sendall(block)
            sent += len(block)
    except OSError:
        pass
    endless_sent[request.target] = sent


def _send_endless_headers(conn: socket.socket, request: Request) -> None:
    _send_endless(conn, request, b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"f" * 1000 + b"\r\n")


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[ScriptedUpstream, Proxy]]:
    upstream = ScriptedUpstream(_hostile)
    proxy = Proxy(
        {
            "upstream": {"url": upstream.url, "read_timeout": 2.0},
            "pipeline": [
                {"use": "access-log", "format": "json"},
                {"use": "inject-headers", "set": {"Authorization": BEARER}},
            ],
        }
    )
    yield upstream, proxy
    hold.set()
    proxy.stop()
    upstream.stop()
    assert TOKEN not in proxy.logs()


class LogWindow:
    """The proxy's log from when this was made."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.start = len(proxy.logs())

    def assert_clean(self, path: str) -> None:
        """No traceback and no token in the window, up to the request for *path*
        (its access line, written when the request is done)."""
        logged = f'"path":"{path}"'
        text = self.proxy.logs(until=lambda text: logged in text[self.start :])[self.start :]
        assert "Traceback" not in text, text
        assert TOKEN not in text


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_upstream_answers_are_a_generic_502(
    hostile: tuple[ScriptedUpstream, Proxy], name: str
) -> None:
    upstream, proxy = hostile
    window = LogWindow(proxy)
    path = f"/malformed/{_slug(name)}"
    response = get_raw(proxy, path)
    assert (response.status, response.body) == (502, b"Bad Gateway\n")
    assert upstream.requests[-1].header("Authorization") == BEARER
    window.assert_clean(path)


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/reset-before-answer", 502, b"Bad Gateway\n"),
        ("/reset-mid-body-small", 502, b"Bad Gateway\n"),
        ("/stall-mid-body-small", 504, b"Gateway Timeout\n"),
    ],
    ids=["reset-before-answer", "reset-mid-body-small", "stall-mid-body-small"],
)
def test_an_upstream_that_fails_before_the_status_goes_out_is_a_502_or_504(
    hostile: tuple[ScriptedUpstream, Proxy], path: str, status: int, body: bytes
) -> None:
    """A reset is a 502, a stall a 504: before answering, or in the middle of a body
    small enough to be read whole before the status goes out."""
    _upstream, proxy = hostile
    window = LogWindow(proxy)
    response = get_raw(proxy, path)
    assert (response.status, response.body) == (status, body)
    window.assert_clean(path)


def test_an_upstream_that_refuses_connections_is_a_502(start_proxy: StartProxy) -> None:
    port = free_port()
    proxy = start_proxy(
        {
            "upstream": {"url": f"http://127.0.0.1:{port}"},
            "pipeline": [{"use": "inject-headers", "set": {"Authorization": BEARER}}],
        }
    )
    response = get_raw(proxy, "/anything")
    assert (response.status, response.body) == (502, b"Bad Gateway\n")
    assert get_raw(proxy, "/readyz").status == 503
    proxy.stop()
    assert "Traceback" not in proxy.logs()


def test_control_characters_in_the_reason_phrase_are_not_relayed(
    hostile: tuple[ScriptedUpstream, Proxy],
) -> None:
    """The status code is relayed with its usual phrase; the server would refuse the bytes."""
    _upstream, proxy = hostile
    window = LogWindow(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(b"GET /control-chars-in-reason HTTP/1.1\r\nHost: x\r\n\r\n")
        status_line = sock.makefile("rb").readline()
    assert status_line == b"HTTP/1.1 200 OK\r\n"
    window.assert_clean("/control-chars-in-reason")


@pytest.mark.parametrize("path", ["/endless-headers", "/endless-interim"])
def test_an_endless_header_block_is_cut_off(
    hostile: tuple[ScriptedUpstream, Proxy], path: str
) -> None:
    """The proxy stops reading (502) long before the upstream's 64 MiB are out."""
    _upstream, proxy = hostile
    window = LogWindow(proxy)
    (worker,) = proxy.worker_pids()
    before = rss_kib(worker)
    response = get_raw(proxy, path, timeout=60)
    assert (response.status, response.body) == (502, b"Bad Gateway\n")
    sent = wait_until(lambda: endless_sent.get(path), what="the upstream to give up")
    assert sent < 16 << 20, f"the proxy read {sent >> 20} MiB of headers"
    assert (rss_kib(worker) - before) < 32 * 1024
    window.assert_clean(path)


@pytest.mark.parametrize("fault", ["reset", "stall"])
@pytest.mark.parametrize("kind", ["big", "chunked"])
def test_a_streamed_body_that_breaks_off_aborts_the_client(
    hostile: tuple[ScriptedUpstream, Proxy], fault: str, kind: str
) -> None:
    """The status is out already: the client must see an incomplete body, never a short
    body that looks whole (a sized body lacks its tail, a chunked one its last chunk)."""
    _upstream, proxy = hostile
    request = f"GET /{fault}-mid-body-{kind} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        raw_request(proxy.port, request.encode(), timeout=60)
    # The proxy is fine afterwards.
    assert get_raw(proxy, "/ok").status == 200


def test_a_100_gib_length_that_closes_early_aborts_without_buffering(
    hostile: tuple[ScriptedUpstream, Proxy],
) -> None:
    _upstream, proxy = hostile
    (worker,) = proxy.worker_pids()
    before = rss_kib(worker)
    head, body = read_all_raw(proxy, "/huge-length")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 107374182400\r\n" in head + b"\r\n"
    assert len(body) == 1 << 20  # what the upstream sent, and nothing made up
    assert set(body) == {ord("h")}
    assert (rss_kib(worker) - before) < 32 * 1024
    assert get_raw(proxy, "/ok").status == 200
    # Counted as it went (socket to socket under gthread), and marked as cut short.
    line = proxy.access_line("/huge-length")
    assert line["bytes"] == 1 << 20 and line["aborted"] == "UpstreamProtocolError"


def test_unsolicited_bytes_on_a_parked_connection_never_answer_the_next_request(
    hostile: tuple[ScriptedUpstream, Proxy],
) -> None:
    upstream, proxy = hostile
    first = get_raw(proxy, "/unsolicited")
    assert (first.status, first.body) == (200, b"ok")
    assert pushed.wait(30)
    for _ in range(3):
        response = get_raw(proxy, "/ok")
        assert (response.status, response.body) == (200, b"ok")
    assert upstream.requests[-1].target == "/ok"


# -- the key endpoint ---------------------------------------------------------------------


def hmac_jwk(secret: bytes, kid: str = "hmac-key") -> dict[str, Any]:
    return {
        "kty": "oct",
        "kid": kid,
        "alg": "HS256",
        "use": "sig",
        "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode(),
    }


HMAC_SECRET = b"a-shared-secret-nobody-should-trust"


class FaultyKeys(JwksServer):
    """The test key server with the faults this module needs on top of its own modes:

    ``trickle`` (a valid document, one byte every 0.2 s), ``html`` (a 502 error
    page in HTML, as a load balancer sends), ``hs256-only`` (a set holding only
    an HMAC key), ``rsa-as-hs256`` (the RSA key labelled ``alg: HS256``),
    ``with-hs256`` (the real keys plus an HMAC key), ``down`` (hang up without a word;
    with :meth:`stop`, the endpoint is gone, kept-alive connections included),
    ``stall-mid-body`` and ``reset-mid-body`` (half the document, then nothing or a RST).
    """

    EXTRA = (
        "trickle",
        "html",
        "hs256-only",
        "rsa-as-hs256",
        "with-hs256",
        "down",
        "stall-mid-body",
        "reset-mid-body",
    )
    MODES = (*JwksServer.MODES, *EXTRA)

    def _handle(self, request: Any) -> None:
        mode = self.mode
        if mode in self.EXTRA:
            with self._lock:
                self.hits += 1
        if mode == "down":
            request.close_connection = True
        elif mode in ("stall-mid-body", "reset-mid-body"):
            body = json.dumps(certs_document(self.keys)).encode()
            request.send_response(200)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body[: len(body) // 2])
            request.wfile.flush()
            if mode == "stall-mid-body":
                self._release.wait(5)
            else:
                reset(request.connection)
            request.close_connection = True
        elif mode == "trickle":
            body = json.dumps(certs_document(self.keys)).encode()
            request.send_response(200)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            try:
                for i in range(len(body)):
                    request.wfile.write(body[i : i + 1])
                    request.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            request.close_connection = True
        elif mode == "html":
            page = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
            request.send_response(502)
            request.send_header("Content-Type", "text/html")
            request.send_header("Content-Length", str(len(page)))
            request.end_headers()
            request.wfile.write(page)
        elif mode in ("hs256-only", "rsa-as-hs256", "with-hs256"):
            document = certs_document(self.keys)
            if mode == "hs256-only":
                document = {"keys": [hmac_jwk(HMAC_SECRET)]}
            elif mode == "rsa-as-hs256":
                document["keys"] = [{**k, "alg": "HS256"} for k in document["keys"]]
            else:
                document["keys"].append(hmac_jwk(HMAC_SECRET))
            self._send(request, 200, json.dumps(document).encode())
        else:
            super()._handle(request)


def hs256_token(kid: str = "hmac-key") -> str:
    import jwt

    return jwt.encode(claims(), HMAC_SECRET, algorithm="HS256", headers={"kid": kid})


def send_token(proxy: Proxy, token: str) -> requests.Response:
    response = requests.get(proxy.url + "/app", headers={JWT_HEADER: token}, timeout=30)
    no_token(response)
    return response


@pytest.mark.parametrize(
    "fault",
    [
        "down",
        "stall",
        "trickle",
        "stall-mid-body",
        "reset-mid-body",
        "garbage",
        "html",
        "hs256-only",
        "rsa-as-hs256",
    ],
)
def test_no_usable_keys_at_start_refuses_everyone_but_health_answers(
    start_proxy: StartProxy, upstream: Upstream, key: SigningKey, fault: str
) -> None:
    with FaultyKeys([key]) as jwks:
        url = jwks.url
        if fault == "down":
            url = f"http://127.0.0.1:{free_port()}/cdn-cgi/access/certs"
        else:
            jwks.set_mode(fault)
        proxy = start_proxy(
            identity_config(upstream, url, keys_timeout=1.0, keys_min_refetch_interval=3600)
        )
        for token in (key.sign(claims()), hs256_token(), hs256_token(key.kid)):
            response = send_token(proxy, token)
            assert (response.status_code, response.text) == (403, "Forbidden\n")
        assert requests.get(proxy.url + "/healthz", timeout=30).status_code == 200
        assert requests.get(proxy.url + "/readyz", timeout=30).status_code == 503
        assert upstream.seen == []
        proxy.logs(until="no keys, refusing every request")
        proxy.stop()
        assert "Traceback" not in proxy.logs()


@pytest.mark.parametrize(("outage", "first"), [("refused", "readyz"), ("error", "token")])
def test_keys_back_after_an_outage_at_start_serve_within_seconds(
    start_proxy: StartProxy, upstream: Upstream, key: SigningKey, outage: str, first: str
) -> None:
    """With no key at all the proxy retries after 1 s, 2 s, 4 s... (not every
    ``min_refetch_interval``, 30 s by default): once the endpoint is back, /readyz
    and a valid token follow within a couple of seconds."""
    holder = socket.socket()  # the endpoint's port, bound but not listening: refused
    holder.bind(("127.0.0.1", 0))
    jwks: FaultyKeys | None = None
    if outage == "error":
        jwks = FaultyKeys([key], mode="error", sock=holder).start()
    url = f"http://127.0.0.1:{holder.getsockname()[1]}{CERTS_PATH}"
    started = time.monotonic()  # no later than the first failed fetch
    proxy = start_proxy(identity_config(upstream, url))
    try:
        token = key.sign(claims())
        if first == "token":  # a refused token spends the request-triggered refetch
            assert send_token(proxy, token).status_code == 403
        assert requests.get(proxy.url + "/readyz", timeout=30).status_code == 503
        if jwks is None:
            jwks = FaultyKeys([key], sock=holder).start()
        else:
            jwks.set_mode("ok")
        back = time.monotonic()
        # Retries 1 s, 2 s, 4 s... after the first failure: the one after *back*
        # is at most as far off as the outage was long, plus the first second.
        # (A fixed 30 s retry would leave the proxy refusing for up to 30 s.)
        within = 2.0 + 1.5 * (back - started)
        wait_until(
            lambda: requests.get(proxy.url + "/readyz", timeout=30).status_code == 200,
            timeout=within,
            what="/readyz 200 after the key endpoint came back",
        )
        assert send_token(proxy, token).status_code == 200
    finally:
        if jwks is not None:
            jwks.stop()
        holder.close()
    assert upstream.seen and all(s.target == "/app" for s in upstream.seen)


#: A failing fetch and what the log says about it.
KEY_FAULTS = {
    "error": "HTTP 503",
    "html": "HTTP 502",
    "garbage": "the key set is not JSON",
    "hs256-only": "has no key for the algorithms",
    "rsa-as-hs256": "the key set has no",
    "trickle": "timed out",
    "stall": "timed out",
    "stall-mid-body": "timed out",
    "reset-mid-body": "broke off",
}


def test_key_endpoint_faults_after_warm_up_keep_the_last_good_keys(
    start_proxy: StartProxy, upstream: Upstream, key: SigningKey
) -> None:
    """Each fault in turn, with a good fetch between them: every request with a valid token
    passes on the last good keys; an HMAC token never does."""
    with FaultyKeys([key]) as jwks:
        config = identity_config(
            upstream,
            jwks.url,
            keys_timeout=1.0,
            keys_refresh_interval=0.3,
            keys_min_refetch_interval=0.3,
            token_cache_size=0,  # verify every time, with the keys as they are now
        )
        # Every failed fetch is logged (repeats at debug): one that timed out
        # on a loaded machine is followed by one that says the fault's reason.
        config["server"] = {"log_level": "debug"}
        proxy = start_proxy(config)
        assert send_token(proxy, key.sign(claims(jti="warm-up"))).status_code == 200
        for mode, reason in KEY_FAULTS.items():
            jwks.set_mode("ok")
            jwks.wait_for_hits(jwks.hits + 2)  # a good fetch: the next failure logs anew
            count = proxy.logs().count(reason)
            jwks.set_mode(mode)
            proxy.logs(until=lambda text, r=reason, c=count: text.count(r) > c)
            response = send_token(proxy, key.sign(claims(jti=mode)))
            assert response.status_code == 200, mode
            assert upstream.last().header("X-Auth-Request-Email") == "alice@example.com"
            assert send_token(proxy, hs256_token()).status_code == 403
        jwks.set_mode("ok")
        jwks.wait_for_hits(jwks.hits + 2)
        jwks.set_mode("down")  # a kept-alive connection is dropped...
        jwks.stop()  # ...and a new one refused
        proxy.logs(until="connection failed; keeping the last good set")
        assert send_token(proxy, key.sign(claims(jti="down"))).status_code == 200
        proxy.stop()
        assert "Traceback" not in proxy.logs()


def test_an_hmac_key_next_to_the_real_ones_is_never_used(
    start_proxy: StartProxy, upstream: Upstream, key: SigningKey
) -> None:
    with FaultyKeys([key]) as jwks:
        jwks.set_mode("with-hs256")
        proxy = start_proxy(identity_config(upstream, jwks.url, keys_timeout=1.0))
        assert send_token(proxy, key.sign(claims())).status_code == 200
        forwarded = len(upstream.seen)
        assert send_token(proxy, hs256_token()).status_code == 403
        assert send_token(proxy, hs256_token(key.kid)).status_code == 403
        assert len(upstream.seen) == forwarded


# -- the token file -------------------------------------------------------------------------

TOKEN2 = "rotated-token-93e1d2c4b5a6"


def test_token_file_deleted_emptied_or_unreadable_while_serving(
    start_proxy: StartProxy, upstream: Upstream, tmp_path: Path
) -> None:
    """The last good token stays in use and one warning is logged; a new file is picked up."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proxy = start_proxy(
        {
            "upstream": {"url": upstream.url},
            "pipeline": [
                {"use": "access-log", "format": "json"},
                {
                    "use": "inject-headers",
                    "set": {"Authorization": f"Bearer ${{file:{token_file}}}"},
                    "file_check_interval": 0.1,
                },
            ],
        }
    )

    def injected() -> str | None:
        response = requests.get(proxy.url + "/x", timeout=30)
        assert response.status_code == 200
        no_token(response)
        assert TOKEN2 not in response.text
        return upstream.last().header("Authorization")

    def serve_until_logged(text: str, before: int, expected: set[str]) -> None:
        """Send requests (the file is looked at when one needs it) until the log has said
        *text* more than *before* times; each must carry one of *expected*."""
        deadline = time.monotonic() + 30
        while proxy.logs().count(text) <= before:
            assert time.monotonic() < deadline, f"the log never said {text!r}"
            assert injected() in expected
            time.sleep(0.05)

    assert injected() == BEARER
    faults: list[tuple[str, Callable[[], None]]] = [
        ("deleted", token_file.unlink),
        ("emptied", lambda: token_file.write_text("")),
        ("not UTF-8", lambda: token_file.write_bytes(b"\xff\xfe\x00junk")),
        ("a directory", lambda: (token_file.unlink(), token_file.mkdir())),
    ]
    if os.geteuid() != 0:  # root reads a file whatever its mode
        faults.append(("mode 000", lambda: token_file.chmod(0)))
    last_good = BEARER
    rotated = f"Bearer {TOKEN2}"
    for i, (_name, fault) in enumerate(faults):
        warned = proxy.logs().count("keeping the last good value")
        fault()
        serve_until_logged("keeping the last good value", warned, {last_good})
        for _ in range(3):
            assert injected() == last_good
        # Readable again, with a rotated token: picked up.
        recovered = proxy.logs().count("is readable again")
        if token_file.is_dir():
            shutil.rmtree(token_file)
        token_file.write_text(TOKEN2 + "\n")
        token_file.chmod(0o600)
        os.utime(token_file, ns=(i + 1, (i + 1) * 10**9))  # a new mtime even within a tick
        serve_until_logged("is readable again", recovered, {last_good, rotated})
        last_good = rotated
        assert injected() == rotated
    proxy.stop()
    logs = proxy.logs()
    assert TOKEN not in logs and TOKEN2 not in logs
    assert "Traceback" not in logs


# -- process faults --------------------------------------------------------------------------


class Held:
    """An upstream that holds each request until :meth:`release`, counting arrivals."""

    def __init__(self) -> None:
        self.arrived = 0
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.upstream = ScriptedUpstream(self._script)

    def _script(self, conn: socket.socket, request: Request) -> bool:
        if request.target.startswith("/hold"):
            with self.lock:
                self.arrived += 1
            self.gate.wait(60)
        body = request.target.encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return True

    def release(self) -> None:
        self.gate.set()

    def stop(self) -> None:
        self.gate.set()
        self.upstream.stop()


@pytest.fixture
def held() -> Iterator[Held]:
    server = Held()
    yield server
    server.stop()


def _fetch(url: str, results: dict[str, Any], key: str) -> None:
    try:
        response = requests.get(url, timeout=60)
        results[key] = (response.status_code, response.text)
    except requests.RequestException as exc:
        results[key] = exc


def _served(port: int, path: str) -> bool:
    """True if a new request on a new connection is answered 200 within 3 s."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    except OSError:  # refused, reset, or no answer in time
        return False


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_in_time(
    start_proxy: StartProxy, held: Held
) -> None:
    """In flight: answered. New: never served, never forwarded (gunicorn stops accepting; the
    kernel may still queue a connection, which is reset at exit). Exit: within the grace time."""
    graceful = 20
    proxy = start_proxy(
        {
            "upstream": {"url": held.upstream.url},
            "server": {"graceful_timeout": graceful, "workers": 2, "threads": 8},
            "pipeline": [{"use": "inject-headers", "set": {"Authorization": BEARER}}],
        },
    )
    wait_until(lambda: len(proxy.worker_pids()) == 2, what="two workers")
    results: dict[str, Any] = {}
    clients = [
        threading.Thread(target=_fetch, args=(f"{proxy.url}/hold/{i}", results, str(i)))
        for i in range(6)
    ]
    for client in clients:
        client.start()
    wait_until(lambda: held.arrived == 6, what="six requests in flight")
    proxy.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    probes = iter(range(1000))
    wait_until(
        lambda: not _served(proxy.port, f"/probe/{next(probes)}"),
        timeout=graceful,
        what="new requests no longer served",
    )
    forwarded = [r.target for r in held.upstream.requests if r.target.startswith("/probe/")]
    assert not _served(proxy.port, "/probe/after")
    assert results == {}, "an in-flight request ended before the upstream answered it"
    held.release()
    for client in clients:
        client.join(60)
    assert results == {str(i): (200, f"/hold/{i}") for i in range(6)}
    assert proxy.process.wait(graceful + 10) == 0
    assert time.monotonic() - signalled < graceful + 10
    # Refused probes never reached the upstream.
    assert [r.target for r in held.upstream.requests if r.target.startswith("/probe/")] == forwarded
    assert "Traceback" not in proxy.logs()


def _upstream_sockets(pid: int, port: int) -> int:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return 0
    return sum(1 for c in connections if c.raddr and c.raddr.port == port)


def test_a_worker_killed_mid_request_is_replaced_and_the_others_keep_serving(
    start_proxy: StartProxy, held: Held
) -> None:
    proxy = start_proxy(
        {
            "upstream": {"url": held.upstream.url},
            "server": {"workers": 2, "threads": 4},
            "pipeline": [{"use": "inject-headers", "set": {"Authorization": BEARER}}],
        },
    )
    workers = wait_until(lambda: len(proxy.worker_pids()) == 2 and proxy.worker_pids())
    port = held.upstream.port
    results: dict[str, Any] = {}

    def start(i: int) -> threading.Thread:
        client = threading.Thread(target=_fetch, args=(f"{proxy.url}/hold/{i}", results, str(i)))
        client.start()
        wait_until(lambda: held.arrived == i + 1, what=f"request {i} at the upstream")
        return client

    clients = [start(0)]
    (victim,) = [pid for pid in workers if _upstream_sockets(pid, port)]
    (survivor,) = [pid for pid in workers if pid != victim]
    # While the victim is stopped only the survivor can accept: request 1 lands there.
    os.kill(victim, signal.SIGSTOP)
    try:
        clients.append(start(1))
    finally:
        os.kill(victim, signal.SIGCONT)
    assert _upstream_sockets(survivor, port) == 1
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(
        lambda: len(pids := proxy.worker_pids()) == 2 and victim not in pids and pids,
        what="a replacement worker",
    )
    assert survivor in replaced
    # The victim's client sees a broken connection, never a made-up answer.
    clients[0].join(60)
    assert isinstance(results["0"], requests.ConnectionError), results
    # The others keep serving, new requests included, while request 1 is still in flight.
    with ThreadPoolExecutor(6) as pool:
        statuses = list(
            pool.map(
                lambda i: requests.get(f"{proxy.url}/new/{i}", timeout=60).status_code, range(12)
            )
        )
    assert statuses == [200] * 12
    assert "1" not in results
    held.release()
    clients[1].join(60)
    assert results["1"] == (200, "/hold/1")
    assert proxy.process.poll() is None
