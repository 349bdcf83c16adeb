"""Hostile requests through the real thing: raw bytes into ``authproxy serve`` (gunicorn),
identity step on, the test token injected, a recording upstream behind.

Every case ends in a clear refusal (a 4xx, or 501 for what HTTP says is not
implemented) or in a faithful forward; never a 500 with a traceback, never the
token anywhere but in the upstream's recorded requests, never a request to a
host other than the upstream, never a second request smuggled past the first.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims
from .scripted import Request, ScriptedUpstream
from .support import TOKEN, Proxy, RawResponse, Upstream, raw_request

BEARER = f"Bearer {TOKEN}"
JWT_HEADER = "Cf-Access-Jwt-Assertion"


class Stack:
    """The module's proxy, its upstream, a trap (a host nothing may reach) and the keys."""

    def __init__(self) -> None:
        self.key = SigningKey("RSA")
        self.jwks = JwksServer([self.key]).start()
        self.upstream = Upstream().start()
        self.trap = Upstream().start()
        self.proxy = Proxy(
            {
                "upstream": {"url": self.upstream.url},
                "pipeline": [
                    {"use": "access-log", "format": "json"},
                    {
                        "use": "identity",
                        "team_domain": TEAM_DOMAIN,
                        "audience": [AUDIENCE],
                        "certs_url": self.jwks.url,
                        "allow_email_domains": ["example.com"],
                        "skip_paths": ["/static/*"],
                    },
                    {
                        "use": "inject-headers",
                        "set": {
                            "Authorization": BEARER,
                            "X-Display-Name": "${identity:display_name}",
                        },
                    },
                ],
            },
            threads=4,
        )
        self._log_mark = 0
        self._markers = 0

    def token(self, **overrides: Any) -> str:
        return self.key.sign(claims(**overrides))

    def request(
        self, first_line: str, *headers: str, body: bytes = b"", token: bool = True
    ) -> bytes:
        """A request as bytes; a valid identity token is added unless *token* is False."""
        lines = [first_line, *headers]
        if token:
            lines.append(f"{JWT_HEADER}: {self.token()}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def settled_logs(self) -> str:
        """The proxy's log once every line logged so far is written: a marker request
        (refused, it has no token) goes through the one worker and its access line is
        written after those."""
        self._markers += 1
        marker = f"/log-marker/{self._markers}"
        request = f"GET {marker} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert raw_request(self.proxy.port, request.encode()).status == 401
        self.proxy.access_line(marker)
        return self.proxy.logs()

    def mark(self) -> None:
        self._log_mark = len(self.settled_logs())

    def new_logs(self) -> str:
        return self.settled_logs()[self._log_mark :]

    def stop(self) -> None:
        self.proxy.stop()
        for server in (self.upstream, self.trap):
            server.stop()
        self.jwks.stop()


@pytest.fixture(scope="module")
def module_stack() -> Iterator[Stack]:
    stack = Stack()
    yield stack
    stack.stop()
    assert TOKEN not in stack.proxy.logs()


@pytest.fixture
def stack(module_stack: Stack) -> Iterator[Stack]:
    """The shared stack, checked after each test: no traceback, no token in the log,
    nothing ever sent to the trap."""
    module_stack.mark()
    yield module_stack
    logs = module_stack.new_logs()
    assert "Traceback" not in logs, logs
    assert TOKEN not in logs
    assert module_stack.trap.seen == []


def exchange(stack: Stack, data: bytes, method: str = "GET") -> RawResponse:
    """Send *data* on a new connection and read one answer; the token is not in it."""
    response = raw_request(stack.proxy.port, data, method=method)
    assert all(TOKEN not in name + value for name, value in response.headers)
    assert TOKEN.encode() not in response.body
    return response


def exchange_all(stack: Stack, data: bytes) -> list[RawResponse]:
    """Send *data* (maybe several pipelined requests) and read every answer until close."""
    answers = []
    with socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=30) as sock:
        sock.sendall(data)
        while True:
            response = http.client.HTTPResponse(sock)
            try:
                response.begin()
            except (http.client.RemoteDisconnected, ConnectionError):
                break
            body = response.read()
            answers.append(RawResponse(response.status, response.getheaders(), body))
            assert TOKEN.encode() not in body
            if response.will_close:
                break
    for answer in answers:
        assert all(TOKEN not in name + value for name, value in answer.headers)
    return answers


def targets(upstream: Upstream, since: int) -> list[str]:
    return [seen.target for seen in upstream.seen[since:]]


# -- request smuggling: ambiguous framing is refused before anything is forwarded --------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
N = len(SMUGGLED)

#: name -> (header lines after the request line, body). Each is ambiguous or malformed.
AMBIGUOUS: dict[str, tuple[list[str], bytes]] = {
    "CL and TE": (["Content-Length: 6", "Transfer-Encoding: chunked"], b"0\r\n\r\n" + SMUGGLED),
    "TE and CL": (["Transfer-Encoding: chunked", "Content-Length: 6"], b"0\r\n\r\n" + SMUGGLED),
    "two different CLs": (["Content-Length: 0", f"Content-Length: {N}"], SMUGGLED),
    "two equal CLs": ([f"Content-Length: {N}", f"Content-Length: {N}"], SMUGGLED),
    "a CL list": ([f"Content-Length: {N}, {N}"], SMUGGLED),
    "a CL with a sign": ([f"Content-Length: +{N}"], SMUGGLED),
    "a negative CL": (["Content-Length: -1"], SMUGGLED),
    "a CL in hex": ([f"Content-Length: {N:#x}"], SMUGGLED),
    "TE twice": (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], b"0\r\n\r\n"),
    "TE chunked, then identity": (["Transfer-Encoding: chunked, identity"], b"0\r\n\r\n"),
    "TE with a vertical tab": (["Transfer-Encoding: \x0bchunked"], b"0\r\n\r\n" + SMUGGLED),
    "TE xchunked": (["Transfer-Encoding: xchunked"], b"0\r\n\r\n" + SMUGGLED),
    "TE gzip, chunked": (["Transfer-Encoding: gzip, chunked"], b"0\r\n\r\n"),
    "TE in HTTP/1.0": (["Transfer-Encoding: chunked"], b"0\r\n\r\n"),  # see the request line
    "obsolete line folding": (["X-Folded: a", " Transfer-Encoding: chunked"], b"0\r\n\r\n"),
    "space before the colon": (["Transfer-Encoding : chunked"], b"0\r\n\r\n" + SMUGGLED),
    "a space inside a name": (["Transfer Encoding: chunked"], b"0\r\n\r\n"),
    "a NUL in a value": (["X-Nul: a\x00b"], b""),
    "a bare CR in a value": (["X-Cr: a\rTransfer-Encoding: chunked"], b"0\r\n\r\n"),
    "a bad chunk size": (["Transfer-Encoding: chunked"], b"zz\r\nhello\r\n0\r\n\r\n"),
    "a chunk without its CRLF": (["Transfer-Encoding: chunked"], b"5\r\nhelloX0\r\n\r\n"),
    "two Hosts": (["Host: evil.example"], b""),
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_ambiguous_framing_is_refused_and_nothing_is_smuggled(stack: Stack, case: str) -> None:
    lines, body = AMBIGUOUS[case]
    version = "HTTP/1.0" if "HTTP/1.0" in case else "HTTP/1.1"
    before = len(stack.upstream.seen)
    data = stack.request(f"POST /framing {version}", "Host: app.example", *lines, body=body)
    answers = exchange_all(stack, data + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers, "no answer at all"
    first = answers[0]
    # 501 is HTTP's answer to a transfer coding the server does not implement.
    allowed = {400, 411, 501} if "TE" in case else {400, 411}
    assert first.status in allowed, (first.status, first.body[:200])
    assert targets(stack.upstream, before) == []


@pytest.mark.parametrize(
    "request_line",
    [
        "GET / HTTP/1.1\nHost: x",  # bare LF after the request line
        "GET /\r\nHost: x",  # HTTP/0.9-ish
        "GET / HTTP/2.0\r\nHost: x",
        "GET / HTTP/1.1 extra\r\nHost: x",
        "GET  / HTTP/1.1\r\nHost: x",
        "get / HTTP/1.1\r\nHost: x",
        "GET /a\x00b HTTP/1.1\r\nHost: x",
        "GET /a\x7fb HTTP/1.1\r\nHost: x",
        "GET /a b HTTP/1.1\r\nHost: x",
        "GET /\xff HTTP/1.1\r\nHost: x",
        "G\x00ET / HTTP/1.1\r\nHost: x",
    ],
)
def test_malformed_request_lines_are_400(stack: Stack, request_line: str) -> None:
    before = len(stack.upstream.seen)
    data = stack.request(request_line, "X-Pad: 1")
    response = exchange(stack, data)
    assert response.status == 400
    assert targets(stack.upstream, before) == []


def test_bare_lf_between_headers_is_400(stack: Stack) -> None:
    before = len(stack.upstream.seen)
    data = stack.request("GET / HTTP/1.1", "Host: x\nTransfer-Encoding: chunked", "X-Pad: 1")
    assert exchange(stack, data + b"0\r\n\r\n").status == 400
    assert targets(stack.upstream, before) == []


def test_pipelined_requests_are_forwarded_one_by_one_with_their_own_bodies(stack: Stack) -> None:
    before = len(stack.upstream.seen)
    first = stack.request("POST /one HTTP/1.1", "Host: x", f"Content-Length: {N}", body=SMUGGLED)
    second = stack.request(
        "POST /two HTTP/1.1",
        "Host: x",
        "Transfer-Encoding: chunked",
        body=b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    third = stack.request("GET /three HTTP/1.1", "Host: x", "Connection: close")
    answers = exchange_all(stack, first + second + third)
    assert [a.status for a in answers] == [200, 200, 200]
    seen = stack.upstream.seen[before:]
    assert [s.target for s in seen] == ["/one", "/two", "/three"]
    assert [s.body_len for s in seen] == [len(SMUGGLED), 5, 0]
    assert all(s.header("Authorization") == BEARER for s in seen)


#: The start of a request, left as the body of one that is refused before it is read.
PREFIX = b"DELETE /smuggled HTTP/1.1\r\nX-Junk: "


@pytest.mark.parametrize(
    "first_line",
    [
        "POST /refused HTTP/1.1",
        # Requests that gunicorn takes and httptools (the loop's parser) does not.
        "FOO /refused HTTP/1.1",
        "POST /refused HTTP/1.2",
    ],
)
def test_an_unread_body_never_starts_the_next_request(stack: Stack, first_line: str) -> None:
    """Refused (no token) before its body is read: the body is drained, so the next
    request on the connection (another person's, through a shared front connection)
    is forwarded as it was sent, not as the value of the refused body's last header."""
    before = len(stack.upstream.seen)
    refused = stack.request(
        first_line, "Host: x", f"Content-Length: {len(PREFIX)}", body=PREFIX, token=False
    )
    with socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=30) as sock:
        sock.sendall(refused)
        first = http.client.HTTPResponse(sock)
        first.begin()
        first.read()
        assert first.status in (400, 401, 501)
        if not first.will_close:
            sock.sendall(stack.request("GET /next HTTP/1.1", "Host: x"))
            second = http.client.HTTPResponse(sock)
            second.begin()
            second.read()
    assert targets(stack.upstream, before) in ([], ["/next"])


def test_a_pipelined_empty_body_does_not_hide_the_body_before_it(stack: Stack) -> None:
    before = len(stack.upstream.seen)
    refused = stack.request(
        "POST /refused HTTP/1.1",
        "Host: x",
        f"Content-Length: {len(PREFIX)}",
        body=PREFIX,
        token=False,
    )
    answers = exchange_all(
        stack,
        refused
        + stack.request("POST /next HTTP/1.1", "Host: x", "Content-Length: 0", "Connection: close"),
    )
    assert [a.status for a in answers] == [401, 200]
    assert targets(stack.upstream, before) == ["/next"]


def test_connection_transfer_encoding_keeps_the_body(stack: Stack) -> None:
    """``Connection`` may name ``Transfer-Encoding``; the body still goes with the request."""
    before = len(stack.upstream.seen)
    data = stack.request(
        "POST /named HTTP/1.1",
        "Host: x",
        "Connection: close, Transfer-Encoding",
        "Transfer-Encoding: chunked",
        body=b"5\r\nhello\r\n0\r\n\r\n",
    )
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert (seen.target, seen.body_len) == ("/named", 5)


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        ("Content-Length: 100", b"12345"),
        ("Transfer-Encoding: chunked", b"5\r\nhello\r\n"),
        # One huge chunk: what follows is data, never a request of its own.
        ("Transfer-Encoding: chunked", b"10000000000000001\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ],
)
def test_a_body_that_never_ends_is_a_400_and_nothing_is_smuggled(
    stack: Stack, framing: str, body: bytes
) -> None:
    """The client stops sending before its body is complete: the upstream gets no complete
    request, the client a 400 (not a 502 blaming the upstream)."""
    before = len(stack.upstream.seen)
    data = stack.request("POST /short HTTP/1.1", "Host: x", framing, body=body)
    with socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert targets(stack.upstream, before) == []


# -- header names gunicorn maps: underscores ---------------------------------------------

SPOOFS = [
    "X_Auth_Request_Email: root@example.com",
    "X_Auth_Request_User: root",
    "Cf_Access_Authenticated_User_Email: root@example.com",
    "Impersonate_User: system:admin",
    "Impersonate_Group: system:masters",
    "X_Forwarded_Host: evil.example",
    "X_Forwarded_Proto: https",
    "X_Display_Name: root",
]


def _assert_no_spoof(seen: Any, injects_display_name: bool = True) -> None:
    assert seen.header("X-Auth-Request-Email") == "alice@example.com"
    assert seen.header("X-Auth-Request-User") == "alice@example.com"
    if injects_display_name:
        assert seen.header("X-Display-Name") is None
    assert seen.header("Cf-Access-Authenticated-User-Email") is None
    assert seen.header("X-Forwarded-Host") == "app.example"
    assert seen.header("X-Forwarded-Proto") == "http"
    names = seen.header_names()
    assert not {n for n in names if n.startswith("impersonate")}
    assert not {n for n in names if "_" in n}
    assert seen.header("Authorization") == BEARER


def test_underscore_headers_are_dropped(stack: Stack) -> None:
    """gunicorn's default ``header_map = "drop"``: ``X_Auth_Request_Email`` could
    otherwise land in the same environ key as ``X-Auth-Request-Email``."""
    before = len(stack.upstream.seen)
    response = exchange(stack, stack.request("GET /us HTTP/1.1", "Host: app.example", *SPOOFS))
    assert response.status == 200
    (seen,) = stack.upstream.seen[before:]
    _assert_no_spoof(seen)


@pytest.mark.parametrize(("header_map", "status"), [("refuse", 400), ("dangerous", 200)])
def test_underscore_headers_under_other_gunicorn_header_maps(
    module_stack: Stack, header_map: str, status: int
) -> None:
    """Run by hand with gunicorn's other settings: refused, or mapped onto the dashed
    names, where the identity step and sanitize remove them like any client copy."""
    stack = module_stack
    proxy = Proxy(
        {
            "upstream": {"url": stack.upstream.url},
            "pipeline": [
                {
                    "use": "identity",
                    "team_domain": TEAM_DOMAIN,
                    "audience": [AUDIENCE],
                    "certs_url": stack.jwks.url,
                },
                {"use": "inject-headers", "set": {"Authorization": BEARER}},
            ],
        },
        via="gunicorn",
        env={"GUNICORN_CMD_ARGS": f"--header-map {header_map}"},
    )
    try:
        before = len(stack.upstream.seen)
        data = stack.request("GET /map HTTP/1.1", "Host: app.example", *SPOOFS)
        response = raw_request(proxy.port, data)
        assert response.status == status
        seen = stack.upstream.seen[before:]
        if status == 200:
            (one,) = seen
            _assert_no_spoof(one, injects_display_name=False)
        else:
            assert seen == []
    finally:
        proxy.stop()
    logs = proxy.logs()
    assert "Traceback" not in logs and TOKEN not in logs


# -- size limits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("a 9 KiB header", ["X-Big: " + "a" * 9000]),
        ("150 headers", [f"X-H{i}: 1" for i in range(150)]),
        ("a 5 KiB target", None),
    ],
)
def test_oversized_requests_are_refused(stack: Stack, what: str, data: list[str] | None) -> None:
    before = len(stack.upstream.seen)
    if data is None:
        request = stack.request("GET /" + "a" * 5000 + " HTTP/1.1", "Host: x")
    else:
        request = stack.request("GET /big HTTP/1.1", "Host: x", *data)
    response = exchange(stack, request)
    assert response.status in (400, 414, 431), what
    assert targets(stack.upstream, before) == []


# -- request targets: only ever the upstream ---------------------------------------------------


@pytest.fixture
def trap_authority(stack: Stack) -> str:
    return f"127.0.0.1:{stack.trap.port}"


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("http://{trap}/x?q=1", "/x?q=1"),
        ("HTTP://{trap}/x", "/x"),
        ("https://{trap}/x", "/x"),
        ("http://{trap}", "/"),
        ("http://{trap}?q=1", "/?q=1"),
        ("http://user:pass@{trap}/x", "/x"),
        ("http://127.0.0.1:1@{trap}/x", "/x"),
        ("//{trap}/x", "//{trap}/x"),
        ("///{trap}/x", "///{trap}/x"),
    ],
)
def test_targets_naming_another_host_reach_only_the_upstream(
    stack: Stack, trap_authority: str, target: str, forwarded: str
) -> None:
    target = target.format(trap=trap_authority)
    before = len(stack.upstream.seen)
    data = stack.request(f"GET {target} HTTP/1.1", f"Host: {trap_authority}")
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.target == forwarded.format(trap=trap_authority)
    assert seen.header("Host") == f"127.0.0.1:{stack.upstream.port}"
    assert seen.header("Authorization") == BEARER


@pytest.mark.parametrize(
    "request_line",
    [
        "CONNECT {trap} HTTP/1.1",
        "CONNECT 127.0.0.1:22 HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "GET {trap}/x HTTP/1.1",
        "GET ftp://{trap}/x HTTP/1.1",
        "GET x HTTP/1.1",
    ],
)
def test_authority_asterisk_and_odd_targets_are_400(
    stack: Stack, trap_authority: str, request_line: str
) -> None:
    before = len(stack.upstream.seen)
    data = stack.request(request_line.format(trap=trap_authority), f"Host: {trap_authority}")
    assert exchange(stack, data).status == 400
    assert targets(stack.upstream, before) == []


@pytest.mark.parametrize(
    "target",
    [
        "/..%2f..%2fetc/passwd",
        "//admin//x",
        "/a%00b",
        "/a%0d%0aX-Injected:%201",
        "/caf%C3%A9;jsessionid=x?q=%0d%0a&r=%00",
        "/a%5c..%5cadmin",
        "/a\\..\\admin",
        "/static/..%2fadmin",
    ],
)
def test_path_tricks_are_forwarded_verbatim_to_the_same_host(stack: Stack, target: str) -> None:
    before = len(stack.upstream.seen)
    data = stack.request(f"GET {target} HTTP/1.1", "Host: app.example")
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.target == target
    assert seen.header("Host") == f"127.0.0.1:{stack.upstream.port}"
    assert "x-injected" not in seen.header_names()


@pytest.mark.parametrize(
    "target",
    [
        "/static/..%2fadmin",
        "/static/../admin",
        "/static/%2e%2e/admin",
        "/static/.%2E/admin",
        "/static//admin",
        "/static/%2fadmin",
        "/static\\..\\admin",
        "/static/%5c..%5cadmin",
        "/static%2f..%2fadmin",
        "/static/%252e%252e/admin",
        "/static/%255c..%255cadmin",
        "/static/..;/admin",
        "/static/x/..%3b/..%3b/admin",
        "/static/x/..%3B/%2e%2e;y/admin",
        "/static/.%2e;/admin",
        "/static/%2f/../..",
        "/static/..%00/admin",
    ],
)
def test_path_tricks_never_skip_the_identity_step(stack: Stack, target: str) -> None:
    """``/static/*`` needs no identity; a path the upstream might resolve elsewhere does."""
    before = len(stack.upstream.seen)
    response = exchange(stack, stack.request(f"GET {target} HTTP/1.1", "Host: x", token=False))
    assert response.status == 401
    assert targets(stack.upstream, before) == []
    skipped = exchange(stack, stack.request("GET /static/app.css HTTP/1.1", "Host: x", token=False))
    assert skipped.status == 200


@pytest.mark.parametrize(
    "target",
    ["/../../etc/passwd", "/%2e%2e/%2e%2e/admin", "/.%2e/admin", "/a/..;/..;/admin", "/..%3b/x"],
)
def test_a_path_above_the_root_is_400_and_not_forwarded(stack: Stack, target: str) -> None:
    """No upstream may resolve it differently from the decision: nothing is decided on it."""
    before = len(stack.upstream.seen)
    assert exchange(stack, stack.request(f"GET {target} HTTP/1.1", "Host: x")).status == 400
    assert targets(stack.upstream, before) == []


@pytest.mark.parametrize("via", ["flag", "gunicorn"])
def test_script_name_and_path_info_headers_move_no_decision(module_stack: Stack, via: str) -> None:
    """gunicorn takes SCRIPT_NAME (and so PATH_INFO) from the headers of a trusted
    peer (loopback, where cloudflared connects from) by default; ``authproxy serve``
    turns that off, and the skip decision is made on the raw target in both cases."""
    stack = module_stack
    proxy = Proxy(
        {
            "upstream": {"url": stack.upstream.url},
            "pipeline": [
                {
                    "use": "identity",
                    "team_domain": TEAM_DOMAIN,
                    "audience": [AUDIENCE],
                    "certs_url": stack.jwks.url,
                    "skip_paths": ["/static/*"],
                },
                {"use": "inject-headers", "set": {"Authorization": BEARER}},
            ],
        },
        via=via,
    )
    try:
        before = len(stack.upstream.seen)
        for forged in ("SCRIPT_NAME: /api/v1/namespaces", "PATH_INFO: /static/x"):
            data = stack.request(
                "GET /api/v1/namespaces/static/secrets HTTP/1.1", "Host: x", forged, token=False
            )
            assert raw_request(proxy.port, data).status == 401, forged
        assert targets(stack.upstream, before) == []
        data = stack.request("GET /api/v1/x HTTP/1.1", "Host: x", "SCRIPT_NAME: /api")
        assert raw_request(proxy.port, data).status == 200
        (seen,) = stack.upstream.seen[before:]
        assert seen.target == "/api/v1/x"
        if via == "flag":  # not even passed on as a header
            assert "script-name" not in seen.header_names()
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.logs()


def test_an_underscore_content_length_is_never_the_upstream_framing(module_stack: Stack) -> None:
    """Plain gunicorn with ``header_map = "dangerous"`` maps ``Content_Length`` to
    ``HTTP_CONTENT_LENGTH``: gunicorn framed no body, so the upstream must not be told
    of one (it would take the next request on the connection as that body)."""
    stack = module_stack
    proxy = Proxy(
        {
            "upstream": {"url": stack.upstream.url, "read_timeout": 3.0},
            "pipeline": [
                {
                    "use": "identity",
                    "team_domain": TEAM_DOMAIN,
                    "audience": [AUDIENCE],
                    "certs_url": stack.jwks.url,
                },
                {"use": "inject-headers", "set": {"Authorization": BEARER}},
            ],
        },
        via="gunicorn",
        env={"GUNICORN_CMD_ARGS": "--header-map dangerous"},
    )
    try:
        before = len(stack.upstream.seen)
        for extra in ("Content_Length: 40", "Content_Type: text/x-forged"):
            data = stack.request("POST /cl HTTP/1.1", "Host: x", extra)
            assert raw_request(proxy.port, data).status == 200, extra
        for seen in stack.upstream.seen[before:]:
            assert seen.header("Content-Length") in (None, "0")
            assert seen.header("Content-Type") is None
            assert seen.body_len == 0
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.logs()


def test_a_target_with_a_fragment_or_unicode_is_not_a_5xx(stack: Stack) -> None:
    for target in ("/x#frag", "/caf\u00e9"):
        data = stack.request(f"GET {target} HTTP/1.1", "Host: x")
        response = exchange(stack, data)
        assert response.status in (200, 400), target


# -- Host, X-Forwarded-* and Forwarded -----------------------------------------------------------


def test_host_and_forwarded_headers_cannot_be_spoofed(stack: Stack) -> None:
    before = len(stack.upstream.seen)
    data = stack.request(
        "GET /spoof HTTP/1.1",
        "Host: public.example",
        "X-Forwarded-Host: evil.example",
        "X-Forwarded-Proto: https",
        "X-Forwarded-For: 203.0.113.9",
        "Forwarded: for=203.0.113.9;host=evil.example;proto=https",
        "X-Forwarded-Server: evil.example",
    )
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.header("Host") == f"127.0.0.1:{stack.upstream.port}"
    assert seen.header("X-Forwarded-Host") == "public.example"
    # The test client is loopback, which gunicorn trusts for the scheme by default.
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1"
    assert seen.header("Forwarded") is None


def test_a_host_naming_another_server_changes_nothing(stack: Stack, trap_authority: str) -> None:
    before = len(stack.upstream.seen)
    data = stack.request("GET /host HTTP/1.1", f"Host: {trap_authority}")
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.header("Host") == f"127.0.0.1:{stack.upstream.port}"
    assert seen.header("X-Forwarded-Host") == trap_authority


# -- Connection naming what the proxy injects or asserts ------------------------------------------

NAMED = [
    "Authorization",
    "X-Auth-Request-Email",
    "X-Auth-Request-User",
    "X-Request-Id",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "Content-Length",
    "Content-Type",
    "Host",
]


@pytest.mark.parametrize("name", NAMED)
def test_connection_cannot_remove_what_the_proxy_sets(stack: Stack, name: str) -> None:
    before = len(stack.upstream.seen)
    data = stack.request(
        "POST /conn HTTP/1.1",
        "Host: app.example",
        f"Connection: keep-alive, {name}",
        "Content-Type: text/plain",
        "Content-Length: 5",
        body=b"hello",
    )
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.header("Authorization") == BEARER
    assert seen.header("X-Auth-Request-Email") == "alice@example.com"
    assert seen.header("X-Auth-Request-User") == "alice@example.com"
    assert seen.header("X-Request-Id")
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("Host") == f"127.0.0.1:{stack.upstream.port}"
    assert (seen.body_len, seen.header("Content-Type")) == (5, "text/plain")


def test_connection_naming_the_identity_header_fails_closed(stack: Stack) -> None:
    before = len(stack.upstream.seen)
    data = stack.request("GET /conn HTTP/1.1", "Host: x", f"Connection: {JWT_HEADER}")
    assert exchange(stack, data).status == 401
    assert targets(stack.upstream, before) == []


# -- CR, LF and friends in every value the proxy builds -------------------------------------------


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        ("alice", b"alice"),
        ("\u0110or\u0111e", "\u0110or\u0111e".encode()),
        # U+010D U+010A: a latin-1 truncation would make them CR LF.
        ("a\u010d\u010aX-Injected: 1", "a\u010d\u010aX-Injected: 1".encode()),
        ("a\u2028b\u0085c", "a\u2028b\u0085c".encode()),
    ],
)
def test_claims_reach_the_upstream_as_utf8_never_as_line_breaks(
    stack: Stack, claim: str, expected: bytes
) -> None:
    before = len(stack.upstream.seen)
    data = stack.request("GET /claim HTTP/1.1", "Host: x", token=False)
    data = data.replace(
        b"\r\n\r\n",
        f"\r\n{JWT_HEADER}: {stack.token(display_name=claim)}\r\n\r\n".encode(),
    )
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.header("X-Display-Name") == expected.decode("latin-1")
    assert "x-injected" not in seen.header_names()


@pytest.mark.parametrize(
    ("claims_", "status"),
    [
        ({"email": "alice@example.com\r\nX-Injected: 1"}, 403),  # an identity header
        ({"email": "alice@example.com\x00"}, 403),
        ({"display_name": "root\r\nX-Injected: 1"}, 500),  # a template (generic 500, logged)
        ({"display_name": "root\nX-Injected: 1"}, 500),
        ({"display_name": "root\x00"}, 500),
    ],
)
def test_claims_with_line_breaks_are_never_sent(
    stack: Stack, claims_: dict[str, str], status: int
) -> None:
    before = len(stack.upstream.seen)
    data = stack.request("GET /crlf HTTP/1.1", "Host: x", token=False)
    token = stack.token(**claims_)
    data = data.replace(b"\r\n\r\n", f"\r\n{JWT_HEADER}: {token}\r\n\r\n".encode())
    response = exchange(stack, data)
    assert response.status == status
    assert b"X-Injected" not in response.body
    assert targets(stack.upstream, before) == []


def test_encoded_line_breaks_stay_encoded_and_a_bad_request_id_is_replaced(stack: Stack) -> None:
    before = len(stack.upstream.seen)
    data = stack.request(
        "GET /a%0d%0aX-Injected:%201?b=%0a%0d HTTP/1.1",
        "Host: x",
        "X-Request-Id: abc%0d%0aX-Injected: 1",
    )
    response = exchange(stack, data)
    assert response.status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.target == "/a%0d%0aX-Injected:%201?b=%0a%0d"
    assert "x-injected" not in seen.header_names()
    request_id = seen.header("X-Request-Id")
    assert request_id and "%" not in request_id and " " not in request_id
    assert response.header("X-Request-ID") == request_id


# -- what a logged-in user could try to read the token with -------------------------------------


def _echo(conn: socket.socket, request: Request) -> bool:
    """An upstream that echoes the request it got, as TRACE is meant to."""
    body = request.head + b"\r\n\r\n"
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: %d\r\n\r\n%b"
        % (len(body), body)
    )
    return True


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
def test_trace_is_not_forwarded_to_an_upstream_that_would_echo_the_token(
    module_stack: Stack, method: str
) -> None:
    stack = module_stack
    echo = ScriptedUpstream(_echo)
    proxy = Proxy(
        {
            "upstream": {"url": echo.url},
            "pipeline": [
                {
                    "use": "identity",
                    "team_domain": TEAM_DOMAIN,
                    "audience": [AUDIENCE],
                    "certs_url": stack.jwks.url,
                },
                {"use": "inject-headers", "set": {"Authorization": BEARER}},
            ],
        }
    )
    try:
        # The upstream really echoes (asked directly, without the proxy).
        direct = raw_request(echo.port, f"{method} /direct HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert direct.body.startswith(f"{method} /direct HTTP/1.1\r\n".encode())
        data = stack.request(f"{method} /api HTTP/1.1", "Host: x")
        response = raw_request(proxy.port, data)
        assert TOKEN.encode() not in response.body
        assert response.status == 501
        assert [r.target for r in echo.requests] == ["/direct"]
    finally:
        proxy.stop()
        echo.stop()
    assert TOKEN not in proxy.logs()


# -- bytes that are not UTF-8 ---------------------------------------------------------------------


@pytest.mark.parametrize("in_cookie", [False, True])
def test_a_cookie_that_is_not_utf8_is_not_a_5xx(stack: Stack, in_cookie: bool) -> None:
    """Latin-1 bytes in some cookie (set by another app on the domain): the token is still
    found, in the header or in its own cookie; no token at all is a 401."""
    junk = "junk=\xff\xfe; "
    before = len(stack.upstream.seen)
    if in_cookie:
        data = stack.request(
            "GET /cookie HTTP/1.1",
            "Host: x",
            f"Cookie: {junk}CF_Authorization={stack.token()}",
            token=False,
        )
    else:
        data = stack.request("GET /cookie HTTP/1.1", "Host: x", f"Cookie: {junk}")
    assert exchange(stack, data).status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.header("X-Auth-Request-Email") == "alice@example.com"
    anonymous = stack.request("GET /cookie HTTP/1.1", "Host: x", "Cookie: a=\xff", token=False)
    assert exchange(stack, anonymous).status == 401
