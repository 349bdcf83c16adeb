"""The cross-origin step: its decision table, where the builder puts it, and real
requests through ``authproxy serve`` (raw sockets, requests, a WebSocket client)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from werkzeug.test import Client

from authproxy import ConfigError, CrossOrigin, build_app
from authproxy.config import Step
from authproxy.context import REFUSAL
from authproxy.headers import UPGRADE_KEY
from authproxy.middleware import cross_origin
from authproxy.pipeline import ADDED_WHERE, with_cross_origin

from .conftest import bearer_config
from .live_support import PATIENCE, LiveUpstream, live_config, read_head
from .support import TOKEN, Proxy, Upstream, raw_request

HOST = "app.example:8000"
EVIL = "https://evil.example"
TOOLS = "https://tools.example.com"


def ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


def environ(method: str = "POST", host: str | None = HOST, **headers: str) -> dict[str, Any]:
    env: dict[str, Any] = {"REQUEST_METHOD": method}
    if host is not None:
        env["HTTP_HOST"] = host
    for name, value in headers.items():
        env[name if name.isupper() or "." in name else "HTTP_" + name.upper()] = value
    return env


# -- the decision table ------------------------------------------------------------

PASS, REFUSE = True, False

TABLE: list[tuple[str, dict[str, Any], bool]] = [
    # Safe methods pass, whoever caused them.
    ("GET", {"sec_fetch_site": "cross-site", "origin": EVIL}, PASS),
    ("HEAD", {"sec_fetch_site": "cross-site", "origin": EVIL}, PASS),
    ("OPTIONS", {"sec_fetch_site": "cross-site", "origin": EVIL}, PASS),
    # Sec-Fetch-Site decides when it is there.
    ("POST", {"sec_fetch_site": "same-origin"}, PASS),
    ("POST", {"sec_fetch_site": "none"}, PASS),
    ("POST", {"sec_fetch_site": "same-site"}, REFUSE),
    ("POST", {"sec_fetch_site": "cross-site"}, REFUSE),
    ("POST", {"sec_fetch_site": "Same-Origin"}, REFUSE),
    ("POST", {"sec_fetch_site": "bogus"}, REFUSE),
    ("POST", {"sec_fetch_site": ""}, REFUSE),
    ("POST", {"sec_fetch_site": "cross-site", "origin": "http://app.example:8000"}, REFUSE),
    ("POST", {"sec_fetch_site": "same-origin", "origin": EVIL}, PASS),
    # Without it, Origin against Host, on host:port, scheme not compared.
    ("POST", {}, PASS),
    ("POST", {"origin": "http://app.example:8000"}, PASS),
    ("POST", {"origin": "https://app.example:8000"}, PASS),
    ("POST", {"origin": "HTTP://APP.example:8000"}, PASS),
    ("POST", {"origin": "http://app.example:8001"}, REFUSE),
    ("POST", {"origin": "http://app.example"}, REFUSE),
    ("POST", {"origin": "http://other.example:8000"}, REFUSE),
    ("POST", {"origin": "http://app.example.evil.example:8000"}, REFUSE),
    ("POST", {"origin": EVIL}, REFUSE),
    ("POST", {"origin": "null"}, REFUSE),
    ("POST", {"origin": ""}, REFUSE),
    ("POST", {"origin": "app.example:8000"}, REFUSE),
    ("POST", {"origin": "http://app.example:8000/"}, REFUSE),
    ("POST", {"origin": "http://user@app.example:8000"}, REFUSE),
    ("POST", {"origin": "http://app.example:99999"}, REFUSE),
    ("POST", {"origin": "ftp://app.example:8000"}, REFUSE),
    ("POST", {"origin": "http://app.example:8000, http://app.example:8000"}, REFUSE),
    # Every other method is unsafe, spelt any way.
    ("PUT", {"origin": EVIL}, REFUSE),
    ("DELETE", {"origin": EVIL}, REFUSE),
    ("PATCH", {"sec_fetch_site": "cross-site"}, REFUSE),
    ("get", {"origin": EVIL}, REFUSE),
    ("PROPFIND", {"origin": EVIL}, REFUSE),
    # An upgrade is unsafe although it is a GET (as the pipeline leaves it, or raw).
    ("GET", {UPGRADE_KEY: "websocket", "origin": EVIL}, REFUSE),
    ("GET", {UPGRADE_KEY: "websocket", "sec_fetch_site": "cross-site"}, REFUSE),
    ("GET", {UPGRADE_KEY: "websocket", "sec_fetch_site": "same-site"}, REFUSE),
    ("GET", {UPGRADE_KEY: "websocket", "origin": "null"}, REFUSE),
    ("GET", {UPGRADE_KEY: "websocket", "upgrade": "websocket", "origin": EVIL}, REFUSE),
    ("GET", {"upgrade": "websocket", "origin": EVIL}, REFUSE),
    ("GET", {UPGRADE_KEY: "websocket", "origin": "http://app.example:8000"}, PASS),
    ("GET", {UPGRADE_KEY: "websocket", "sec_fetch_site": "same-origin"}, PASS),
    ("GET", {UPGRADE_KEY: "websocket"}, PASS),
]


@pytest.mark.parametrize(("method", "headers", "passes"), TABLE)
def test_decision_table(method: str, headers: dict[str, Any], passes: bool) -> None:
    step = CrossOrigin(ok_app)
    reason = step.check(environ(method, **headers))
    assert (reason is None) is passes, reason


@pytest.mark.parametrize(
    ("host", "origin", "passes"),
    [
        # A Host without a port is the default port of the scheme the browser used.
        ("a.example", "https://a.example", PASS),
        ("a.example", "http://a.example", PASS),
        ("a.example:443", "https://a.example", PASS),
        ("a.example:80", "http://a.example", PASS),
        ("A.Example", "https://a.example", PASS),
        ("a.example:80", "https://a.example", REFUSE),
        ("a.example:443", "http://a.example", REFUSE),
        ("a.example", "https://a.example:8443", REFUSE),
        ("a.example", "https://a.example:80", REFUSE),
        ("[::1]:8000", "http://[::1]:8000", PASS),
        ("[::1]:8000", "http://[::2]:8000", REFUSE),
        ("127.0.0.1:8000", "http://localhost:8000", REFUSE),
        ("a.example:x", "https://a.example", REFUSE),
        ("a.example/evil", "https://a.example", REFUSE),
        ("", "https://a.example", REFUSE),
        (None, "https://a.example", REFUSE),
    ],
)
def test_origin_against_host(host: str | None, origin: str, passes: bool) -> None:
    reason = CrossOrigin(ok_app).check(environ("POST", host=host, origin=origin))
    assert (reason is None) is passes, reason


@pytest.mark.parametrize(
    ("headers", "passes"),
    [
        ({"sec_fetch_site": "cross-site", "origin": TOOLS}, PASS),
        ({"sec_fetch_site": "same-site", "origin": TOOLS}, PASS),
        ({"origin": TOOLS}, PASS),
        ({"origin": "https://TOOLS.example.com:443"}, PASS),
        ({UPGRADE_KEY: "websocket", "origin": TOOLS}, PASS),
        ({"sec_fetch_site": "cross-site", "origin": "http://tools.example.com"}, REFUSE),
        ({"sec_fetch_site": "cross-site", "origin": "https://tools.example.com:8443"}, REFUSE),
        ({"sec_fetch_site": "cross-site", "origin": "https://sub.tools.example.com"}, REFUSE),
        ({"sec_fetch_site": "cross-site"}, REFUSE),
        ({"origin": EVIL}, REFUSE),
    ],
)
def test_trusted_origins(headers: dict[str, Any], passes: bool) -> None:
    step = CrossOrigin(ok_app, trusted_origins=[TOOLS, "http://localhost:3000"])
    assert (step.check(environ("POST", **headers)) is None) is passes


def test_a_refusal_is_a_generic_403_with_the_reason_for_the_log() -> None:
    seen: list[str] = []

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(env["REQUEST_METHOD"])
        return ok_app(env, start_response)

    env = environ("POST", sec_fetch_site="cross-site", origin=EVIL)
    captured: list[str] = []
    body = b"".join(CrossOrigin(app)(env, lambda status, *_: captured.append(status)))
    assert captured == ["403 Forbidden"] and body == b"Forbidden\n"
    assert not seen
    assert env[REFUSAL] == "cross-origin: POST with Sec-Fetch-Site 'cross-site'"
    env = environ("GET", origin="http://evil.example\r\nX: 1", **{UPGRADE_KEY: "websocket"})
    assert CrossOrigin(app).check(env) == (
        "upgrade 'websocket' from Origin 'http://evil.example\\r\\nX: 1' to Host 'app.example:8000'"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "tools.example.com",
        "https://tools.example.com/",
        "https://tools.example.com/app",
        "https://tools.example.com?x",
        "https://tools.example.com#x",
        "https://user@tools.example.com",
        "https://tools.example.com:99999",
        "https://tools.example.com:",
        "ftp://tools.example.com",
        "https://",
        "null",
        "",
        5,
    ],
)
def test_trusted_origins_are_checked_at_construction(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        CrossOrigin(ok_app, trusted_origins=[bad])
    assert info.value.key == "trusted_origins" and repr(bad) in info.value.problem


def test_options_of_the_wrong_shape_are_config_errors(upstream: Upstream) -> None:
    with pytest.raises(ConfigError, match="trusted_origins"):
        CrossOrigin(ok_app, trusted_origins=TOOLS)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="enabled"):
        CrossOrigin(ok_app, enabled="no")  # type: ignore[arg-type]
    config = {
        "upstream": {"url": upstream.url},
        "pipeline": [{"use": "cross-origin", "trusted_origins": ["https://x.example/path"]}],
    }
    with pytest.raises(ConfigError) as info:
        build_app(config)
    assert info.value.key == "pipeline[0] (cross-origin).trusted_origins"


def test_disabled_passes_everything_and_warns_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cross_origin, "_WARNED_DISABLED", [])
    steps = [CrossOrigin(ok_app, enabled=False) for _ in range(2)]
    warnings = [r for r in caplog.records if r.name == "authproxy.cross_origin"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "OFF" in warnings[0].getMessage()
    env = environ("POST", sec_fetch_site="cross-site", origin=EVIL)
    assert Client(steps[0]).post("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert b"".join(steps[1](env, lambda *a: None)) == b"ok"
    assert steps[0].describe() == {"enabled": False}


# -- where the builder puts it -----------------------------------------------------


def steps(*names: str) -> tuple[Step, ...]:
    return tuple(Step(n, {}, f"pipeline[{i}] ({n})") for i, n in enumerate(names))


@pytest.mark.parametrize(
    ("configured", "built"),
    [
        ((), ["cross-origin"]),
        (("access-log",), ["access-log", "cross-origin"]),
        (("access-log", "identity"), ["access-log", "cross-origin", "identity"]),
        (
            ("access-log", "access-log", "identity", "inject-headers"),
            ["access-log", "access-log", "cross-origin", "identity", "inject-headers"],
        ),
        (
            ("metrics", "access-log", "identity"),
            ["cross-origin", "metrics", "access-log", "identity"],
        ),
        # Listed: the config's place, nothing added.
        (("identity", "cross-origin"), ["identity", "cross-origin"]),
        (("access-log", "cross-origin", "identity"), ["access-log", "cross-origin", "identity"]),
    ],
)
def test_the_builder_adds_it_before_the_first_step_that_is_not_the_access_log(
    configured: tuple[str, ...], built: list[str]
) -> None:
    result = with_cross_origin(steps(*configured))
    assert [s.use for s in result] == built
    added = [s for s in result if s.where == ADDED_WHERE]
    assert len(added) == (0 if "cross-origin" in configured else 1)


def test_a_listed_step_keeps_its_options(upstream: Upstream) -> None:
    config = {
        "upstream": {"url": upstream.url},
        "pipeline": [
            {"use": "access-log"},
            {"use": "inject-headers", "set": {"X-A": "1"}},
            {"use": "cross-origin", "trusted_origins": [TOOLS]},
        ],
    }
    app = build_app(config)
    try:
        assert [n for n, _ in app.steps] == ["access-log", "inject-headers", "cross-origin"]
        step = app.steps[2][1]
        assert isinstance(step, CrossOrigin) and step.trusted_origins == (TOOLS,)
        assert step.describe() == {"trusted_origins": [TOOLS]}
    finally:
        app.close()


def test_with_no_steps_it_still_runs(upstream: Upstream) -> None:
    app = build_app({"upstream": {"url": upstream.url}})
    try:
        assert [n for n, _ in app.steps] == ["cross-origin"]
        client = Client(app)
        response = client.post("/", headers={"Sec-Fetch-Site": "cross-site"})
        assert response.status_code == 403
        assert not upstream.seen
        assert client.post("/", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert upstream.last().method == "POST"
    finally:
        app.close()


# -- through authproxy serve --------------------------------------------------------


def post(proxy: Proxy, path: str, headers: dict[str, str], body: bytes = b"x=1") -> Any:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{proxy.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    return raw_request(proxy.port, "\r\n".join(lines).encode() + body, method="POST")


def test_a_cross_site_post_is_refused_and_never_reaches_the_upstream(
    start_proxy: Callable[..., Proxy], upstream: Upstream
) -> None:
    proxy = start_proxy(bearer_config(upstream))
    response = post(proxy, "/api/terminals", {"Sec-Fetch-Site": "cross-site", "Origin": EVIL})
    assert response.status == 403
    assert response.body == b"Forbidden\n"
    assert TOKEN.encode() not in response.body
    assert not upstream.seen
    line = proxy.access_line("/api/terminals")
    assert line["status"] == 403
    assert line["refusal"] == "cross-origin: POST with Sec-Fetch-Site 'cross-site'"
    # An older browser: no Sec-Fetch-Site, an Origin that is not the Host.
    response = post(proxy, "/api/old", {"Origin": EVIL})
    assert response.status == 403 and not upstream.seen
    assert proxy.access_line("/api/old")["refusal"] == (
        f"cross-origin: POST from Origin {EVIL!r} to Host '127.0.0.1:{proxy.port}'"
    )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Sec-Fetch-Site": "same-origin"}, id="same-origin"),
        pytest.param({"Sec-Fetch-Site": "none"}, id="none"),
        pytest.param({}, id="no-headers"),
        pytest.param({"Origin": "{proxy}"}, id="origin-is-host"),
    ],
)
def test_same_origin_and_non_browser_posts_pass(
    start_proxy: Callable[..., Proxy], upstream: Upstream, headers: dict[str, str]
) -> None:
    proxy = start_proxy(bearer_config(upstream))
    headers = {k: v.format(proxy=proxy.url) for k, v in headers.items()}
    response = post(proxy, "/api/terminals", headers)
    assert response.status == 200
    seen = upstream.last()
    assert (seen.method, seen.target) == ("POST", "/api/terminals")
    assert seen.header("Authorization") == f"Bearer {TOKEN}"
    assert proxy.access_line("/api/terminals")["refusal"] is None


def test_trusted_origins_let_a_listed_origin_through(
    start_proxy: Callable[..., Proxy], upstream: Upstream
) -> None:
    config = bearer_config(upstream)
    config["pipeline"].insert(1, {"use": "cross-origin", "trusted_origins": [TOOLS]})
    proxy = start_proxy(config)
    assert post(proxy, "/a", {"Sec-Fetch-Site": "cross-site", "Origin": TOOLS}).status == 200
    assert upstream.last().target == "/a"
    assert post(proxy, "/b", {"Sec-Fetch-Site": "cross-site", "Origin": EVIL}).status == 403
    assert [s.target for s in upstream.seen] == ["/a"]


def test_disabled_lets_cross_site_requests_through_and_warns_once(
    start_proxy: Callable[..., Proxy], upstream: Upstream
) -> None:
    config = bearer_config(upstream)
    config["pipeline"].insert(1, {"use": "cross-origin", "enabled": False})
    config["server"] = {"workers": 2}
    proxy = start_proxy(config)
    assert post(proxy, "/a", {"Sec-Fetch-Site": "cross-site", "Origin": EVIL}).status == 200
    assert upstream.last().target == "/a"
    proxy.stop()
    logs = proxy.logs()
    assert logs.count("cross-origin protection is OFF") == 1
    assert "WARNING" in logs.split("cross-origin protection is OFF")[0].splitlines()[-1]


@pytest.fixture
def live() -> Iterator[LiveUpstream]:
    server = LiveUpstream().start()
    yield server
    server.stop()


def handshake(proxy: Proxy, path: str, **headers: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{proxy.port}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()),
        "",
        "",
    ]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENCE) as sock:
        sock.sendall("\r\n".join(lines).encode())
        head, _ = read_head(sock)
    return head


@pytest.mark.parametrize("worker_class", ["authproxy", "gevent"])
def test_a_cross_site_websocket_upgrade_is_refused(
    start_proxy: Callable[..., Proxy], live: LiveUpstream, worker_class: str
) -> None:
    proxy = start_proxy({**live_config(live, TOKEN), "server": {"worker_class": worker_class}})
    head = handshake(proxy, "/ws/echo", Origin=EVIL)
    assert head.startswith(b"HTTP/1.1 403 ")
    head = handshake(proxy, "/ws/echo", Sec_Fetch_Site="cross-site", Origin=EVIL)
    assert head.startswith(b"HTTP/1.1 403 ")
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{proxy.port}/ws/echo", origin=EVIL, open_timeout=PATIENCE)
    assert info.value.response.status_code == 403
    assert not live.requests_to("/ws/echo")
    line = proxy.access_line("/ws/echo")
    assert line["status"] == 403
    assert line["refusal"].startswith("cross-origin: upgrade 'websocket' from Origin")
    # The same handshake from the proxy's own origin is relayed.
    own = f"http://127.0.0.1:{proxy.port}"
    with connect(f"ws://127.0.0.1:{proxy.port}/ws/echo?id=own", origin=own) as conn:
        conn.send("hi")
        assert conn.recv(timeout=PATIENCE) == "hi"
    seen = live.requests_to("/ws/echo")
    assert len(seen) == 1 and seen[0].header("Authorization") == f"Bearer {TOKEN}"
