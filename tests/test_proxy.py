"""Behaviour of the whole proxy: ``authproxy serve`` (real gunicorn) in front of a real upstream.

Every test talks HTTP over loopback; the upstream records exactly what reached it.
"""

from __future__ import annotations

import gzip
import hashlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import bearer_config
from .support import (
    TOKEN,
    KeepAliveUpstream,
    Pki,
    Proxy,
    RawResponse,
    Upstream,
    assert_no_secret,
    free_port,
    gzip_big,
    make_pki,
    one_answer_upstream,
    raw_request,
    rss_kib,
    sha256_of_pattern,
    wait_until,
)

StartProxy = Callable[..., Proxy]
BEARER = f"Bearer {TOKEN}"


def raw(port: int, data: bytes) -> RawResponse:
    """A raw-socket exchange; the token must be in neither the headers nor the body."""
    response = raw_request(port, data)
    assert all(TOKEN not in name + value for name, value in response.headers)
    assert TOKEN.encode() not in response.body
    return response


def get(proxy: Proxy, path: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", 30)
    response = requests.get(proxy.url + path, **kwargs)
    assert_no_secret(response)
    return response


@pytest.fixture
def proxy(start_proxy: StartProxy, upstream: Upstream) -> Proxy:
    return start_proxy(bearer_config(upstream))


# -- seed compatibility and configuration sources ---------------------------------


def test_go_sidecar_environment_injects_bearer_and_logs_one_json_line_per_request(
    start_proxy: StartProxy, upstream: Upstream
) -> None:
    proxy = start_proxy(env={"DASHBOARD_PROXY_URL": upstream.url, "DASHBOARD_TOKEN": TOKEN})
    paths = ["/api/v1/login", "/status/404", "/x?token=abc"]
    statuses = [get(proxy, p).status_code for p in paths]
    assert statuses == [200, 404, 200]
    assert [s.header("Authorization") for s in upstream.seen] == [BEARER] * 3
    lines = proxy.access_lines(count=3)
    # Each worker writes its lines in batches: across workers, in any order.
    assert sorted((line["path"], line["status"]) for line in lines) == [
        ("/api/v1/login", 200),
        ("/status/404", 404),
        ("/x", 200),  # the query stays out of the log
    ]
    assert all(line["method"] == "GET" and line["request_id"] for line in lines)
    assert TOKEN not in proxy.logs()


@pytest.mark.parametrize("via", ["flag", "env", "gunicorn"])
def test_config_file_is_found(start_proxy: StartProxy, upstream: Upstream, via: str) -> None:
    """``serve --config``, ``serve`` with AUTHPROXY_CONFIG, and plain gunicorn on authproxy.wsgi."""
    config = bearer_config(upstream)
    config["health"] = {"live": "/custom-live"}
    proxy = start_proxy(config, via=via)
    assert get(proxy, "/custom-live").text == "ok\n"
    assert get(proxy, "/hello").text == "ok"
    assert [s.target for s in upstream.seen] == ["/hello"]
    assert upstream.last().header("Authorization") == BEARER
    assert proxy.access_line("/hello")["status"] == 200


# -- the request target ------------------------------------------------------------


RAW_TARGETS = [
    "/a%2Fb/%7Euser/%2f/%zz/caf%C3%A9?q=%2F&x=%7e&y=%zz&&z",
    "//double//slashes/?",
    "/semi;colon;a=b/%252F",
]


@pytest.mark.parametrize("target", RAW_TARGETS)
def test_raw_path_and_query_arrive_byte_exact(
    proxy: Proxy, upstream: Upstream, target: str
) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
    response = raw(proxy.port, request.encode())
    assert response.status == 200, response
    assert upstream.last().target == target


@pytest.mark.parametrize(
    ("base", "target", "expected"),
    [
        ("/base", "/x%2Fy?q=1", "/base/x%2Fy?q=1"),
        ("/base/", "/x", "/base/x"),
        ("/base/", "/", "/base/"),
        ("/", "/x", "/x"),
        ("/base?k=v", "/x?q=1", "/base/x?k=v&q=1"),
        ("/base?k=v", "/x", "/base/x?k=v"),
    ],
)
def test_upstream_base_path_is_joined_like_go(
    start_proxy: StartProxy, upstream: Upstream, base: str, target: str, expected: str
) -> None:
    config = bearer_config(upstream)
    config["upstream"]["url"] = upstream.url + base
    proxy = start_proxy(config)
    request = f"GET {target} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
    assert raw(proxy.port, request.encode()).status == 200
    assert upstream.last().target == expected


def test_absolute_form_target_reaches_only_the_upstream(proxy: Proxy, upstream: Upstream) -> None:
    other = Upstream().start()
    try:
        request = (
            f"GET http://127.0.0.1:{other.port}/elsewhere?q=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{other.port}\r\nConnection: close\r\n\r\n"
        )
        response = raw(proxy.port, request.encode())
        assert response.status == 200
        assert TOKEN.encode() not in response.body
        assert upstream.last().target == "/elsewhere?q=1"
        assert upstream.last().header("Host") == f"127.0.0.1:{upstream.port}"
        assert upstream.last().header("Authorization") == BEARER
        assert other.seen == []
    finally:
        other.stop()


# -- headers -----------------------------------------------------------------------


def test_connection_header_cannot_delete_the_injected_token(
    proxy: Proxy, upstream: Upstream
) -> None:
    """The Go program's hole: ``Connection: Authorization`` removed the injected header."""
    response = get(
        proxy,
        "/",
        headers={
            "Connection": "keep-alive, Authorization, X-Drop-Me, X-Request-ID",
            "Authorization": "Bearer client-supplied",
            "X-Drop-Me": "1",
            "X-Keep-Me": "1",
        },
    )
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.header("Authorization") == BEARER
    assert seen.header("X-Drop-Me") is None
    assert seen.header("X-Keep-Me") == "1"
    # The request id is the proxy's own, so it arrives although Connection named it.
    assert seen.header("X-Request-Id") == response.headers["X-Request-ID"]


def test_hop_by_hop_request_headers_are_stripped(proxy: Proxy, upstream: Upstream) -> None:
    request = (
        "GET /hop-test HTTP/1.1\r\n"
        "Host: example.test\r\n"
        "Connection: close, X-Listed\r\n"
        "X-Listed: 1\r\n"
        "Keep-Alive: timeout=5\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n"
        "Te: gzip\r\n"
        "Trailer: X-Checksum\r\n"
        "Impersonate-User: system:admin\r\n"
        "Impersonate-Group: system:masters\r\n"
        "Impersonate-Uid: 0\r\n"
        "Impersonate-Extra-Scopes: all\r\n"
        "X-End-To-End: kept\r\n"
        "\r\n"
    )
    assert raw(proxy.port, request.encode()).status == 200
    names = upstream.last().header_names()
    for gone in (
        "x-listed",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "impersonate-user",
        "impersonate-group",
        "impersonate-uid",
        "impersonate-extra-scopes",
    ):
        assert gone not in names
    assert upstream.last().header("X-End-To-End") == "kept"
    assert upstream.last().header("Authorization") == BEARER


@pytest.mark.parametrize("connection", ["close", "close, te"])
def test_te_trailers_is_kept_as_go_does(proxy: Proxy, upstream: Upstream, connection: str) -> None:
    request = (
        "GET / HTTP/1.1\r\nHost: example.test\r\n"
        f"Connection: {connection}\r\nTe: gzip, trailers\r\n\r\n"
    )
    assert raw(proxy.port, request.encode()).status == 200
    assert upstream.last().header("Te") == "trailers"


def test_impersonation_headers_pass_when_stripping_is_off(
    start_proxy: StartProxy, upstream: Upstream
) -> None:
    proxy = start_proxy(bearer_config(upstream, strip_impersonation=False))
    get(proxy, "/", headers={"Impersonate-User": "jane"})
    assert upstream.last().header("Impersonate-User") == "jane"


def test_hop_by_hop_response_headers_are_stripped(proxy: Proxy, upstream: Upstream) -> None:
    direct = requests.get(upstream.url + "/hop", timeout=30)
    assert direct.headers["X-Secret-Hop"] == "1"  # the upstream really sends them
    response = get(proxy, "/hop")
    assert response.status_code == 200
    assert "X-Secret-Hop" not in response.headers
    assert "Keep-Alive" not in response.headers
    assert "X-Secret-Hop" not in response.headers.get("Connection", "")


def test_forwarded_headers(start_proxy: StartProxy, upstream: Upstream) -> None:
    config = bearer_config(upstream)
    # The test client is not a trusted proxy here: its X-Forwarded-Proto is a claim.
    config["server"] = {"forwarded_allow_ips": "192.0.2.1"}
    proxy = start_proxy(config)
    get(
        proxy,
        "/",
        headers={
            "Host": "public.example:8443",
            "X-Forwarded-For": "203.0.113.7, 10.0.0.1",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "spoofed.example",
        },
    )
    seen = upstream.last()
    assert seen.header("X-Forwarded-For") == "203.0.113.7, 10.0.0.1, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == "public.example:8443"
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"
    get(proxy, "/")
    assert upstream.last().header("X-Forwarded-For") == "127.0.0.1"


def test_trusted_front_proxy_sets_the_forwarded_proto(proxy: Proxy, upstream: Upstream) -> None:
    """127.0.0.1 is trusted by default (cloudflared next door): its scheme is believed."""
    get(proxy, "/", headers={"X-Forwarded-Proto": "https"})
    assert upstream.last().header("X-Forwarded-Proto") == "https"


def test_preserve_host(start_proxy: StartProxy, upstream: Upstream) -> None:
    proxy = start_proxy(bearer_config(upstream, preserve_host=True))
    get(proxy, "/", headers={"Host": "public.example"})
    assert upstream.last().header("Host") == "public.example"


def test_no_user_agent_or_accept_encoding_of_its_own(proxy: Proxy, upstream: Upstream) -> None:
    request = b"GET /bare HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
    assert raw(proxy.port, request).status == 200
    names = upstream.last().header_names()
    assert "user-agent" not in names
    assert "accept-encoding" not in names
    assert "connection" not in names
    assert names >= {"host", "authorization", "x-forwarded-for"}
    get(proxy, "/", headers={"User-Agent": "curl/8.0", "Accept-Encoding": "br"})
    assert upstream.last().header("User-Agent") == "curl/8.0"
    assert upstream.last().header("Accept-Encoding") == "br"


# -- response bodies ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/gzip", "/gzip-big"])
def test_compressed_body_passes_byte_identical(proxy: Proxy, upstream: Upstream, path: str) -> None:
    response = requests.get(
        proxy.url + path, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=30
    )
    body = response.raw.read(decode_content=False)
    assert TOKEN.encode() not in body
    assert all(TOKEN not in value for value in response.headers.values())
    assert response.headers["Content-Encoding"] == "gzip"
    expected = gzip_big() if path == "/gzip-big" else gzip.compress(b"hello " * 1000)
    assert gzip.decompress(body) == gzip.decompress(expected)
    if path == "/gzip-big":
        assert body == expected
    else:
        assert response.headers["Content-Length"] == str(len(body))
    assert upstream.last().header("Accept-Encoding") == "gzip"


def test_redirects_are_relayed_not_followed(proxy: Proxy, upstream: Upstream) -> None:
    response = get(proxy, "/redirect", allow_redirects=False)
    assert response.status_code == 302
    assert response.headers["Location"] == "/elsewhere"
    assert response.content == b"go away\r\n"
    assert [s.target for s in upstream.seen] == ["/redirect"]


def test_repeated_set_cookie_headers_stay_separate(proxy: Proxy) -> None:
    response = get(proxy, "/cookies")
    assert response.raw.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2, c=3"]


def test_status_and_empty_bodies(proxy: Proxy) -> None:
    assert get(proxy, "/status/418").status_code == 418
    no_content = get(proxy, "/status/204")
    assert (no_content.status_code, no_content.content) == (204, b"")
    head = requests.head(proxy.url + "/bytes/5000?cl=1", timeout=30)
    assert (head.status_code, head.headers["Content-Length"], head.content) == (200, "5000", b"")


# -- isolation between clients and from the environment ---------------------------


def test_cookies_are_not_shared_between_clients(proxy: Proxy, upstream: Upstream) -> None:
    alice, bob = requests.Session(), requests.Session()
    response = alice.get(proxy.url + "/set-cookie?session=alice", timeout=30)
    assert response.headers["Set-Cookie"] == "session=alice; Path=/"
    alice.get(proxy.url + "/alice-again", timeout=30)
    assert upstream.last().header("Cookie") == "session=alice"  # the client's own jar
    bob.get(proxy.url + "/bob", timeout=30)
    assert upstream.last().header("Cookie") is None
    requests.get(proxy.url + "/anyone", timeout=30)
    assert upstream.last().header("Cookie") is None


def test_environment_proxies_and_netrc_have_no_effect(
    start_proxy: StartProxy, upstream: Upstream, tmp_path: Path
) -> None:
    trap = Upstream().start()  # what an env proxy would point at
    try:
        home = tmp_path / "home"
        home.mkdir()
        netrc = home / ".netrc"
        netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-pass\n")
        netrc.chmod(0o600)
        env = {
            "HOME": str(home),
            "NETRC": str(netrc),
            "HTTP_PROXY": trap.url,
            "HTTPS_PROXY": trap.url,
            "http_proxy": trap.url,
            "https_proxy": trap.url,
            "ALL_PROXY": trap.url,
            "NO_PROXY": "",
            "no_proxy": "",
        }
        # No injected header here, so a netrc Authorization would be visible.
        proxy = start_proxy({"upstream": {"url": upstream.url}}, env=env)
        assert get(proxy, "/through").status_code == 200
        assert [s.target for s in upstream.seen] == ["/through"]
        assert upstream.last().header("Authorization") is None
        assert trap.seen == []
    finally:
        trap.stop()


# -- TLS to the upstream -------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_upstream(pki: Pki) -> Iterator[Upstream]:
    server = Upstream(ssl_context=pki.server_context()).start()
    yield server
    server.stop()


def test_tls_is_verified_by_default(start_proxy: StartProxy, tls_upstream: Upstream) -> None:
    proxy = start_proxy(bearer_config(tls_upstream))
    response = get(proxy, "/secret-place")
    assert (response.status_code, response.text) == (502, "Bad Gateway\n")
    assert tls_upstream.seen == []


def test_tls_verify_false_works_and_warns_once(
    start_proxy: StartProxy, tls_upstream: Upstream
) -> None:
    proxy = start_proxy(bearer_config(tls_upstream, tls_verify=False), workers=2)
    for _ in range(3):
        assert get(proxy, "/unverified").status_code == 200
    assert tls_upstream.last().header("Authorization") == BEARER
    proxy.stop()
    warnings = [line for line in proxy.logs().splitlines() if "verification" in line.lower()]
    assert len(warnings) == 1, warnings
    assert "WARNING" in warnings[0]


@pytest.mark.parametrize(("bundle", "status"), [("ca", 200), ("other_ca", 502)])
def test_tls_verify_against_a_ca_bundle(
    start_proxy: StartProxy, tls_upstream: Upstream, pki: Pki, bundle: str, status: int
) -> None:
    proxy = start_proxy(bearer_config(tls_upstream, tls_verify=str(getattr(pki, bundle))))
    assert get(proxy, "/bundle").status_code == status
    assert len(tls_upstream.seen) == (1 if status == 200 else 0)


@pytest.mark.parametrize(
    ("tls_verify", "env_ca", "status"),
    [(True, "ca", 502), ("other_ca", "ca", 502), (False, "other_ca", 200)],
)
def test_ca_bundle_environment_does_not_override_the_config(
    start_proxy: StartProxy,
    tls_upstream: Upstream,
    pki: Pki,
    tls_verify: bool | str,
    env_ca: str,
    status: int,
) -> None:
    verify = str(getattr(pki, tls_verify)) if isinstance(tls_verify, str) else tls_verify
    bundle = str(getattr(pki, env_ca))
    env = {"REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle}
    proxy = start_proxy(bearer_config(tls_upstream, tls_verify=verify), env=env)
    assert get(proxy, "/env-ca").status_code == status


def test_default_trust_is_the_system_store(
    start_proxy: StartProxy, tls_upstream: Upstream, pki: Pki
) -> None:
    """``tls_verify = true`` trusts OpenSSL's system store, which (as for Go's
    crypto/x509) SSL_CERT_FILE names; an explicit bundle ignores it."""
    env = {"SSL_CERT_FILE": str(pki.ca), "SSL_CERT_DIR": str(pki.directory / "none")}
    proxy = start_proxy(bearer_config(tls_upstream), env=env)
    assert get(proxy, "/system-store").status_code == 200
    strict = start_proxy(bearer_config(tls_upstream, tls_verify=str(pki.other_ca)), env=env)
    assert get(strict, "/system-store").status_code == 502


@pytest.mark.parametrize("with_cert", [True, False])
def test_client_certificate_for_mutual_tls(
    start_proxy: StartProxy, pki: Pki, with_cert: bool
) -> None:
    server = Upstream(ssl_context=pki.server_context(require_client_cert=True)).start()
    try:
        options: dict[str, Any] = {"tls_verify": str(pki.ca)}
        if with_cert:
            options.update(client_cert=str(pki.client_cert), client_key=str(pki.client_key))
        proxy = start_proxy(bearer_config(server, **options))
        assert get(proxy, "/mtls").status_code == (200 if with_cert else 502)
        assert len(server.seen) == (1 if with_cert else 0)
    finally:
        server.stop()


# -- why the upstream failed, in the log ---------------------------------------------


def failure_line(proxy: Proxy, path: str) -> str:
    """The proxy's log line for the failed upstream request to *path*."""
    return str(
        wait_until(
            lambda: next((x for x in proxy.logs().splitlines() if f"GET {path}:" in x), None),
            what=f"a failure line for {path}",
        )
    )


def test_a_self_signed_upstream_is_logged_as_a_certificate_problem_with_the_fix(
    start_proxy: StartProxy, pki: Pki
) -> None:
    server = Upstream(ssl_context=pki.self_signed_context()).start()
    try:
        proxy = start_proxy(bearer_config(server))  # tls_verify: the default
        response = get(proxy, "/self-signed")
        assert (response.status_code, response.text) == (502, "Bad Gateway\n")
        assert server.seen == []
        line = failure_line(proxy, "/self-signed")
        assert "certificate verify failed: self-signed certificate" in line
        assert 'tls_verify = "/path/ca.pem"' in line and "tls_verify = false" in line
        assert "refused" not in line and "Upstream" not in line
    finally:
        server.stop()


def test_a_certificate_for_another_host_is_logged_as_a_mismatch(
    start_proxy: StartProxy, tls_upstream: Upstream, pki: Pki
) -> None:
    url = tls_upstream.url.replace("127.0.0.1", "localhost")  # the certificate names 127.0.0.1
    proxy = start_proxy(bearer_config(tls_upstream, url=url, tls_verify=str(pki.ca)))
    assert get(proxy, "/elsewhere").status_code == 502
    line = failure_line(proxy, "/elsewhere")
    assert "certificate verify failed" in line and "mismatch" in line.lower()
    assert "[upstream] url" in line and "tls_verify = false" in line


def test_a_dead_upstream_port_is_logged_as_refused(start_proxy: StartProxy) -> None:
    proxy = start_proxy({"upstream": {"url": f"http://127.0.0.1:{free_port()}"}})
    response = get(proxy, "/nobody-home")
    assert (response.status_code, response.text) == (502, "Bad Gateway\n")
    line = failure_line(proxy, "/nobody-home")
    assert "connection refused" in line and "certificate" not in line


# -- health --------------------------------------------------------------------------


def test_health_endpoints_are_answered_locally(proxy: Proxy, upstream: Upstream) -> None:
    live = get(proxy, "/healthz")
    assert (live.status_code, live.text) == (200, "ok\n")
    ready = get(proxy, "/readyz")
    assert (ready.status_code, ready.text) == (200, "ok\n")
    assert upstream.seen == []


def test_readyz_is_503_when_the_upstream_is_down(start_proxy: StartProxy) -> None:
    config = {"upstream": {"url": f"http://127.0.0.1:{free_port()}"}}
    proxy = start_proxy(config)
    ready = get(proxy, "/readyz")
    assert ready.status_code == 503
    assert get(proxy, "/healthz").status_code == 200


# -- failures ------------------------------------------------------------------------


def test_upstream_down_gives_a_short_generic_502(start_proxy: StartProxy) -> None:
    port = free_port()
    config = {
        "upstream": {"url": f"http://127.0.0.1:{port}"},
        "pipeline": [{"use": "inject-headers", "set": {"Authorization": BEARER}}],
    }
    proxy = start_proxy(config)
    response = get(proxy, "/anything")
    assert response.status_code == 502
    assert response.text == "Bad Gateway\n"
    assert str(port) not in response.text


def test_upstream_hanging_past_read_timeout_gives_504(
    start_proxy: StartProxy, upstream: Upstream
) -> None:
    proxy = start_proxy(bearer_config(upstream, read_timeout=1.0))
    response = get(proxy, "/sleep/4")
    assert response.status_code == 504
    assert response.text == "Gateway Timeout\n"


@pytest.mark.parametrize("path", ["/truncate", "/truncate-chunked"])
def test_mid_stream_upstream_failure_aborts_the_client(proxy: Proxy, path: str) -> None:
    response = requests.get(proxy.url + path, stream=True, timeout=30)
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.RequestException):
        for _ in response.iter_content(65536):
            pass


def test_mid_stream_failure_is_incomplete_on_the_wire(proxy: Proxy) -> None:
    """Read it raw: a chunked body must lack its last chunk, a sized one its tail."""
    for path in ("/truncate", "/truncate-chunked"):
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        with pytest.raises(http_incomplete()):
            raw(proxy.port, request)


def http_incomplete() -> tuple[type[BaseException], ...]:
    import http.client

    return (http.client.IncompleteRead, ConnectionError)


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nhello", 502, b"Bad Gateway\n"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            502,
            b"Bad Gateway\n",
        ),
    ],
)
def test_upstream_framing_errors_do_not_reach_the_client(
    start_proxy: StartProxy, answer: bytes, status: int, body: bytes
) -> None:
    listener, thread = one_answer_upstream(answer)
    try:
        proxy = start_proxy({"upstream": {"url": f"http://127.0.0.1:{listener.getsockname()[1]}"}})
        response = raw(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (response.status, response.body) == (status, body)
        proxy.stop()
        assert "Traceback" not in proxy.logs()
    finally:
        thread.join(10)
        listener.close()


def test_small_truncated_body_becomes_502(proxy: Proxy) -> None:
    response = get(proxy, "/truncate-small")
    assert response.status_code == 502
    assert response.text == "Bad Gateway\n"


@pytest.mark.parametrize("keep_alive", [False, True])
def test_client_going_away_closes_the_upstream_response(
    start_proxy: StartProxy, upstream: Upstream, keep_alive: bool
) -> None:
    """With a keep-alive upstream nothing but the forwarder can close that connection."""
    server: Upstream | KeepAliveUpstream = KeepAliveUpstream() if keep_alive else upstream
    try:
        proxy = start_proxy({"upstream": {"url": server.url}})
        response = requests.get(proxy.url + "/endless", stream=True, timeout=30)
        assert response.status_code == 200
        # Read from the raw stream: leaving iter_content early on a chunked body
        # makes urllib3 close the connection, which is the client going away.
        received = 0
        while received <= 1 << 20:
            piece = response.raw.read(65536)
            assert piece, "the body ended"
            received += len(piece)
        assert not server.disconnected.wait(0.5), "the upstream was dropped while the client read"
        response.close()
        assert server.disconnected.wait(60), "the upstream never saw the client leave"
    finally:
        if keep_alive:
            server.stop()


def test_upstream_connections_are_pooled(start_proxy: StartProxy) -> None:
    server = KeepAliveUpstream()
    try:
        proxy = start_proxy({"upstream": {"url": server.url}})
        for path in ("/one", "/two", "/three"):
            assert get(proxy, path).text == "ok"
        assert [path for path, _ in server.seen] == ["/one", "/two", "/three"]
        assert len({port for _, port in server.seen}) == 1, "a new connection per request"
    finally:
        server.stop()


# -- bodies in both directions -------------------------------------------------------


def _blocks(total: int, seed: bytes = b"upload") -> Iterator[bytes]:
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        sent += len(piece)
        yield piece


def _sha256(total: int) -> str:
    digest = hashlib.sha256()
    for piece in _blocks(total):
        digest.update(piece)
    return digest.hexdigest()


UPLOAD = 5 * 1024 * 1024 + 123


def test_chunked_upload_arrives_intact(proxy: Proxy, upstream: Upstream) -> None:
    response = requests.post(proxy.url + "/upload", data=_blocks(UPLOAD), timeout=60)
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.header("Transfer-Encoding") == "chunked"
    assert seen.header("Content-Length") is None
    assert (seen.body_len, seen.body_sha256) == (UPLOAD, _sha256(UPLOAD))
    assert seen.header("Authorization") == BEARER


def test_sized_upload_arrives_intact(proxy: Proxy, upstream: Upstream) -> None:
    body = b"".join(_blocks(UPLOAD))
    response = requests.put(proxy.url + "/upload", data=body, timeout=60)
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.header("Content-Length") == str(UPLOAD)
    assert seen.header("Transfer-Encoding") is None
    assert (seen.body_len, seen.body_sha256) == (UPLOAD, _sha256(UPLOAD))


@pytest.mark.parametrize("sized", [False, True])
def test_download_arrives_intact(proxy: Proxy, sized: bool) -> None:
    n = 3 * 1024 * 1024 + 7
    response = requests.get(proxy.url + f"/bytes/{n}" + ("?cl=1" if sized else ""), timeout=60)
    assert hashlib.sha256(response.content).hexdigest() == sha256_of_pattern(n)
    if sized:
        assert response.headers["Content-Length"] == str(n)


@pytest.mark.slow
@pytest.mark.parametrize("sized", [False, True])
def test_large_download_streams_in_bounded_memory(
    start_proxy: StartProxy, upstream: Upstream, sized: bool
) -> None:
    proxy = start_proxy(bearer_config(upstream), threads=2)
    (worker,) = wait_until(proxy.worker_pids, what="a gunicorn worker")
    # Warm up: imports, the pool and the first buffers are allocated by now.
    assert len(requests.get(proxy.url + "/bytes/4194304", timeout=60).content) == 4194304
    before = rss_kib(worker)
    n = 256 * 1024 * 1024
    digest, received = hashlib.sha256(), 0
    path = f"/bytes/{n}" + ("?cl=1" if sized else "")
    with requests.get(proxy.url + path, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers.get("Content-Length") == (str(n) if sized else None)
        for chunk in response.iter_content(1 << 20):
            digest.update(chunk)
            received += len(chunk)
    after = rss_kib(worker)
    assert received == n
    assert digest.hexdigest() == sha256_of_pattern(n)
    grown_mib = (after - before) / 1024
    assert grown_mib < 8, f"the worker's RSS grew by {grown_mib:.1f} MiB for a {n >> 20} MiB body"


# -- shutdown ------------------------------------------------------------------------


def test_sigterm_lets_an_in_flight_request_finish(
    start_proxy: StartProxy, upstream: Upstream
) -> None:
    proxy = start_proxy(bearer_config(upstream))
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            response = requests.get(proxy.url + "/sleep/3", timeout=60)
            result["status"], result["body"] = response.status_code, response.text
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    client = threading.Thread(target=slow)
    client.start()
    wait_until(lambda: upstream.seen, what="the slow request at the upstream")
    proxy.process.send_signal(signal.SIGTERM)
    client.join(60)
    assert result == {"status": 200, "body": "slept"}
    assert proxy.process.wait(60) == 0
    # New connections are refused once it has stopped.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
