"""AccessLog and RequestId around small WSGI apps; one real-gunicorn check at the end."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from werkzeug.test import Client

from authproxy import AccessLog, RequestId
from authproxy.context import IDENTITY, REFUSAL, REQUEST_ID, UPSTREAM_MS, VerifiedIdentity, refuse
from authproxy.errors import ConfigError
from authproxy.middleware.access_log import client_address, parse_networks

from .conftest import bearer_config
from .support import TOKEN, assert_no_secret, wait_until

FIELDS = {
    "bytes",
    "client",
    "duration_ms",
    "identity",
    "method",
    "path",
    "protocol",
    "referer",
    "refusal",
    "request_id",
    "status",
    "time",
    "upstream_ms",
    "user_agent",
}


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ[UPSTREAM_MS] = 1.5
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello ", b"world"]


class client(Client):
    """A test client that closes the response iterable, as a server does."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, use_cookies=False)

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        kwargs.setdefault("environ_base", {"REMOTE_ADDR": "127.0.0.1"})
        return super().open(*args, **kwargs)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "authproxy.access"]


def test_json_line_has_every_field(caplog: pytest.LogCaptureFixture) -> None:
    app = RequestId(AccessLog(hello))
    response = client(app).get(
        "/path/x?token=abc", headers={"User-Agent": "ua/1", "Referer": "http://r/"}
    )
    assert response.status_code == 200
    (line,) = access_lines(caplog)
    record = json.loads(line)
    assert FIELDS <= set(record)
    assert record["method"] == "GET"
    assert record["path"] == "/path/x", "the query is redacted by default"
    assert record["status"] == 200
    assert record["bytes"] == len(b"hello world")
    assert record["upstream_ms"] == 1.5
    assert record["user_agent"] == "ua/1"
    assert record["request_id"] == response.headers["X-Request-ID"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["duration_ms"] >= 0


def test_query_kept_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    client(AccessLog(hello, log_query=True)).get("/p?a=1")
    assert json.loads(access_lines(caplog)[0])["path"] == "/p?a=1"


def test_combined_format(caplog: pytest.LogCaptureFixture) -> None:
    client(AccessLog(hello, format="combined")).get("/c", headers={"User-Agent": "ua/2"})
    (line,) = access_lines(caplog)
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /c HTTP/1\.1" '
        r'200 11 "-" "ua/2" [\d.]+',
        line,
    ), line


def test_combined_format_ends_with_the_refusal_reason(caplog: pytest.LogCaptureFixture) -> None:
    def refusing(environ: dict[str, Any], start_response: Any) -> Any:
        return refuse(environ, start_response, 403, "not allowed by policy: eve@\u2028evil.com")

    client(AccessLog(refusing, format="combined")).get("/c")
    (line,) = access_lines(caplog)
    assert " 403 " in line
    # JSON string escapes: no raw line separator reaches the log.
    assert line.endswith(' refusal="not allowed by policy: eve@\\u2028evil.com"'), line


def test_unknown_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="format"):
        AccessLog(hello, format="xml")


def test_line_is_written_when_the_body_is_done(caplog: pytest.LogCaptureFixture) -> None:
    def slow_body(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"a"
        assert not access_lines(caplog), "logged before the body was sent"
        yield b"b"

    client(AccessLog(slow_body)).get("/")
    assert json.loads(access_lines(caplog)[0])["bytes"] == 2


def test_aborted_body_is_marked(caplog: pytest.LogCaptureFixture) -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"part"
        raise ConnectionResetError("upstream went away")

    with pytest.raises(ConnectionResetError):
        client(AccessLog(broken)).get("/")
    record = json.loads(access_lines(caplog)[0])
    assert record["aborted"] == "ConnectionResetError"
    assert record["bytes"] == 4


def test_identity_and_refusal_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    def refusing(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ[IDENTITY] = VerifiedIdentity(subject="s", service_token="ci-robot")
        environ[REFUSAL] = "not in allow_service_tokens"
        start_response("403 Forbidden", [])
        return [b"Forbidden\n"]

    client(AccessLog(refusing)).get("/")
    record = json.loads(access_lines(caplog)[0])
    assert record["identity"] == "ci-robot"
    assert record["refusal"] == "not in allow_service_tokens"
    assert record["status"] == 403


def test_sensitive_headers_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    app = AccessLog(
        hello, log_headers=["Authorization", "Cookie", "X-Trace", "Cf-Access-Jwt-Assertion"]
    )
    client(app).get(
        "/",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Cookie": f"CF_Authorization={TOKEN}",
            "Cf-Access-Jwt-Assertion": TOKEN,
            "X-Trace": "t-1",
        },
    )
    (line,) = access_lines(caplog)
    assert TOKEN not in line
    headers = json.loads(line)["headers"]
    assert headers == {
        "Authorization": "***",
        "Cookie": "***",
        "Cf-Access-Jwt-Assertion": "***",
        "X-Trace": "t-1",
    }


@pytest.mark.parametrize(
    "peer, forwarded, trusted, expected",
    [
        ("127.0.0.1", "203.0.113.9", ["127.0.0.0/8"], "203.0.113.9"),
        ("127.0.0.1", "198.51.100.1, 203.0.113.9", ["127.0.0.0/8"], "203.0.113.9"),
        ("127.0.0.1", "198.51.100.1, 10.0.0.2", ["127.0.0.0/8", "10.0.0.0/8"], "198.51.100.1"),
        ("192.0.2.7", "203.0.113.9", ["127.0.0.0/8"], "192.0.2.7"),  # untrusted peer: ignored
        ("127.0.0.1", None, ["127.0.0.0/8"], "127.0.0.1"),
        ("127.0.0.1", "203.0.113.9", [], "127.0.0.1"),  # nobody trusted
    ],
)
def test_client_address_trusts_only_trusted_proxies(
    peer: str, forwarded: str | None, trusted: list[str], expected: str
) -> None:
    environ = {"REMOTE_ADDR": peer}
    if forwarded is not None:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    networks = parse_networks(trusted, "trusted_proxies")
    assert client_address(environ, networks, "HTTP_X_FORWARDED_FOR") == expected


def test_cf_connecting_ip_when_configured(caplog: pytest.LogCaptureFixture) -> None:
    app = AccessLog(hello, client_ip_header="Cf-Connecting-Ip")
    client(app).get("/", headers={"Cf-Connecting-Ip": "203.0.113.50", "X-Forwarded-For": "1.2.3.4"})
    assert json.loads(access_lines(caplog)[0])["client"] == "203.0.113.50"


def test_bad_trusted_proxies_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        AccessLog(hello, trusted_proxies=["not-a-network"])


# -- request ids ---------------------------------------------------------------


def seen_id(environ_out: dict[str, Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ_out.update(environ)
        start_response("200 OK", [("X-Request-ID", "upstream-chose-this")])
        return [b""]

    return app


def test_sane_incoming_id_is_reused_everywhere() -> None:
    env: dict[str, Any] = {}
    response = client(RequestId(seen_id(env))).get("/", headers={"X-Request-ID": "abc-123.X:y"})
    assert env[REQUEST_ID] == "abc-123.X:y"
    assert env["HTTP_X_REQUEST_ID"] == "abc-123.X:y"
    assert response.headers.getlist("X-Request-ID") == ["abc-123.X:y"]


@pytest.mark.parametrize(
    "incoming", ["", "x" * 129, "has space", 'quote"d', "new\\line", "ünïcode", "semi;colon"]
)
def test_insane_incoming_id_is_replaced(incoming: str) -> None:
    env: dict[str, Any] = {}
    headers = {"X-Request-ID": incoming} if incoming else {}
    response = client(RequestId(seen_id(env))).get("/", headers=headers)
    new = env[REQUEST_ID]
    assert new != incoming and re.fullmatch(r"[0-9a-f]{32}", new)
    assert env["HTTP_X_REQUEST_ID"] == new
    assert response.headers.getlist("X-Request-ID") == [new]


def test_incoming_id_ignored_when_not_trusted() -> None:
    env: dict[str, Any] = {}
    client(RequestId(seen_id(env), trust_incoming=False)).get("/", headers={"X-Request-ID": "abc"})
    assert env[REQUEST_ID] != "abc"


# -- through a real gunicorn ---------------------------------------------------


def test_request_id_round_trip_and_log_through_gunicorn(upstream: Any, start_proxy: Any) -> None:
    proxy = start_proxy(bearer_config(upstream))
    response = requests.get(
        proxy.url + "/x?q=secret-query", headers={"X-Request-ID": "trace-42"}, timeout=10
    )
    assert_no_secret(response)
    assert response.headers["X-Request-ID"] == "trace-42"
    assert upstream.last().header("X-Request-Id") == "trace-42"
    assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"
    proxy.stop()
    (record,) = [r for r in proxy.access_lines() if r["request_id"] == "trace-42"]
    assert record["path"] == "/x" and record["status"] == 200
    assert "secret-query" not in proxy.logs()


def test_access_lines_appear_while_the_proxy_runs(upstream: Any, start_proxy: Any) -> None:
    """Lines are batched, not held: each shows up soon after its request, not at exit."""
    proxy = start_proxy(bearer_config(upstream))
    for n in range(3):
        assert requests.get(f"{proxy.url}/batch/{n}", timeout=10).status_code == 200
    lines = proxy.access_lines(count=3, timeout=10)
    assert proxy.process.poll() is None
    assert sorted(line["path"] for line in lines) == ["/batch/0", "/batch/1", "/batch/2"]
    assert TOKEN not in proxy.logs()


# -- lines nobody can forge, through gunicorn ------------------------------------------


#: Inside a JSON string, an escape (\\uXXXX, \\", ...) or anything but '"' and '\\'.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_COMBINED = re.compile(
    rf"(?P<client>[!#-~]+|{_QUOTED}) - (?P<identity>[!#-~]+|{_QUOTED}) \[[^\]]+\] "
    rf"(?P<request>{_QUOTED}) \d{{3}} \d+ {_QUOTED} {_QUOTED} [0-9.]+"
    rf"(?: refusal={_QUOTED})?"
)
#: What splitlines() (and many log shippers) take for a line break, beyond CR and LF.
_BREAKS = ("\r", "\0", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _field(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


@pytest.mark.parametrize("identity_headers", [None, {}])
@pytest.mark.parametrize("log_format", ["json", "combined"])
def test_hostile_claims_and_headers_never_forge_a_line(
    upstream: Any, start_proxy: Any, log_format: str, identity_headers: dict[str, str] | None
) -> None:
    """Exactly one well-formed line per request, whatever claims and headers say."""
    from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims
    from .support import raw_request

    key = SigningKey("RSA")
    fake = '127.0.0.1 - admin@example.com [01/Jan/2026:00:00:00 +0000] "GET /x HTTP/1.1" 200'
    emails = [
        "a\u2028b@example.com",
        "c\u0085d@example.com",
        "e\u2029f@example.com",
        "g\r\nh@example.com",
        "i\0j@example.com",
        f'k {fake} "@example.com',
        "alice@example.com",
    ]
    headers = [
        "X-Forwarded-For: " + fake,  # not an address: the peer is the client
        "X-Forwarded-For: 203.0.113.9, " + fake,
        "X-Forwarded-For: 203.0.113.9",
        "User-Agent: ua\x85" + fake,
        "Referer: r\x85" + fake,
    ]
    config: dict[str, Any] = {
        "upstream": {"url": upstream.url},
        "pipeline": [
            {"use": "access-log", "format": log_format},
            {"use": "identity", "team_domain": TEAM_DOMAIN, "audience": [AUDIENCE]},
        ],
    }
    if identity_headers is not None:
        config["pipeline"][1]["identity_headers"] = identity_headers
    with JwksServer([key]) as jwks:
        config["pipeline"][1]["certs_url"] = jwks.url
        proxy = start_proxy(config)
        sent = []
        for i, email in enumerate(emails):
            token = key.sign(claims(email=email, name=f"n\u2028{i}\r\nx"))
            data = f"GET /mark/{i} HTTP/1.1\r\nHost: x\r\nCf-Access-Jwt-Assertion: {token}\r\n\r\n"
            sent.append(raw_request(proxy.port, data.encode("utf-8")).status)
        token = key.sign(claims())
        for j, header in enumerate(headers, start=len(emails)):
            lines = [
                f"GET /mark/{j} HTTP/1.1",
                "Host: x",
                header,
                f"Cf-Access-Jwt-Assertion: {token}",
            ]
            sent.append(
                raw_request(proxy.port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")).status
            )
        assert sent[0:3] == [200, 200, 200] and sent[3:5] == [403, 403]
        total = len(emails) + len(headers)
        wait_until(lambda: proxy.logs().count("/mark/") >= total, timeout=10, what="the lines")
        text = proxy.logs()
    for char in _BREAKS:
        assert char not in text, f"a raw {char!r} in the log"
    marked = [line for line in text.splitlines() if "/mark/" in line]
    assert len(marked) == total, marked
    by_index: dict[int, tuple[str, str | None]] = {}
    for line in marked:
        if log_format == "json":
            record = json.loads(line)
            path, client, identity = record["path"], record["client"], record["identity"]
        else:
            match = _COMBINED.fullmatch(line)
            assert match, line
            path = _field(match["request"]).split(" ")[1]
            client, identity = _field(match["client"]), _field(match["identity"])
            identity = None if identity == "-" else identity
        index = int(path.rsplit("/", 1)[1])
        assert index not in by_index
        by_index[index] = (client, identity)
    assert by_index[0] == ("127.0.0.1", emails[0])
    assert by_index[1] == ("127.0.0.1", emails[1])
    assert by_index[5] == ("127.0.0.1", emails[5])
    n = len(emails)
    assert [by_index[n + k][0] for k in range(len(headers))] == [
        "127.0.0.1",
        "127.0.0.1",
        "203.0.113.9",
        "127.0.0.1",
        "127.0.0.1",
    ]
