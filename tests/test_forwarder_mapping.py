"""The forwarder's request and response mapping, against requests' own adapter mocked by
``responses``: milliseconds per test, no socket.

The forwarder is given a session with a plain :class:`~requests.adapters.HTTPAdapter`
mounted for the upstream, so it takes its generic path (the one any adapter of a
user's gets); ``responses`` replaces that adapter's ``send``. What goes over a real
socket (framing, streaming, TLS, the transport adapter) is tested against real
servers in test_forwarder.py, test_proxy.py and test_adapter.py.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses
from requests.adapters import HTTPAdapter
from urllib3.util import SKIP_HEADER
from werkzeug.test import Client

from authproxy import Forwarder

UPSTREAM = "http://upstream.test:8080"


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def forwarder(session: requests.Session | None = None, **options: Any) -> Forwarder:
    session = session or requests.Session()
    session.mount(UPSTREAM + "/", HTTPAdapter())
    return Forwarder(UPSTREAM, session=session, **options)


def sent(mock: responses.RequestsMock) -> requests.PreparedRequest:
    assert len(mock.calls) == 1
    request: requests.PreparedRequest = mock.calls[0].request
    return request


# -- the request -------------------------------------------------------------------


def test_the_target_is_sent_as_the_client_wrote_it(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, UPSTREAM + "/a%2Fb/%7E", body="ok")
    raw = "/a%2Fb/%7E?q=%zz&x=1+2"
    response = Client(forwarder()).get("/ignored", environ_overrides={"RAW_URI": raw})
    assert response.status_code == 200
    assert sent(mocked).url == UPSTREAM + raw


def test_hop_by_hop_request_headers_are_not_forwarded(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, UPSTREAM + "/", body="ok")
    Client(forwarder()).get(
        "/",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "listed in Connection",
            "Keep-Alive": "timeout=5",
            "TE": "gzip",
            "Proxy-Authorization": "Basic eDp5",
            "X-End-To-End": "kept",
        },
    )
    headers = sent(mocked).headers
    for name in ("Connection", "X-Private", "Keep-Alive", "TE", "Proxy-Authorization"):
        assert name not in headers, name
    assert headers["X-End-To-End"] == "kept"


def test_forwarding_headers_are_set_and_the_host_is_the_upstreams(
    mocked: responses.RequestsMock,
) -> None:
    mocked.add(responses.GET, UPSTREAM + "/", body="ok")
    Client(forwarder()).get(
        "/",
        headers={
            "Host": "proxy.example",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "Forwarded": "for=198.51.100.1",
        },
        environ_overrides={"REMOTE_ADDR": "192.0.2.7"},
    )
    headers = sent(mocked).headers
    assert headers["Host"] == "upstream.test:8080"
    assert headers["X-Forwarded-For"] == "203.0.113.9, 192.0.2.7"  # appended, not replaced
    assert headers["X-Forwarded-Proto"] == "http"  # the client's claim is not believed
    assert headers["X-Forwarded-Host"] == "proxy.example"
    assert "Forwarded" not in headers


def test_the_clients_user_agent_is_forwarded_and_none_is_added(
    mocked: responses.RequestsMock,
) -> None:
    mocked.add(responses.GET, UPSTREAM + "/", body="ok")
    app = forwarder()
    Client(app).get("/", headers={"User-Agent": "curl/8.5", "Accept-Encoding": "br"})
    headers = sent(mocked).headers
    assert (headers["User-Agent"], headers["Accept-Encoding"]) == ("curl/8.5", "br")
    mocked.calls.reset()
    Client(app).get("/", environ_overrides={"HTTP_USER_AGENT": ""})
    headers = sent(mocked).headers
    # urllib3's sign for "send none of your own": neither python-requests nor identity.
    assert headers["User-Agent"] in ("", SKIP_HEADER)
    assert headers["Accept-Encoding"] == SKIP_HEADER


def test_lines_a_step_added_stay_separate(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, UPSTREAM + "/", body="ok")
    extra = [("Impersonate-Group", "dev"), ("Impersonate-Group", "ops")]
    Client(forwarder()).get("/", environ_overrides={"authproxy.extra_headers": extra})
    assert sent(mocked).headers.getlist("Impersonate-Group") == ["dev", "ops"]  # type: ignore[attr-defined]


class Signer(requests.auth.AuthBase):
    """A request signer: adds a header computed from the request it is given."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body if isinstance(request.body, bytes) else b"?"
        request.headers["X-Signature"] = f"{request.method} {request.url} {len(body)}"
        return request


def test_session_auth_signs_the_request_and_session_headers_are_not_sent(
    mocked: responses.RequestsMock,
) -> None:
    mocked.add(responses.POST, UPSTREAM + "/sign", body="ok")
    session = requests.Session()
    session.auth = Signer()
    session.headers["X-From-Session"] = "not forwarded"
    Client(forwarder(session)).post("/sign?x=%41", data=b"12345")
    request = sent(mocked)
    assert request.headers["X-Signature"] == f"POST {UPSTREAM}/sign?x=%41 5"
    assert "X-From-Session" not in request.headers


def test_session_auth_as_a_pair_is_basic_auth(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, UPSTREAM + "/", body="ok")
    session = requests.Session()
    session.auth = ("user", "pass")
    Client(forwarder(session)).get("/")
    assert sent(mocked).headers["Authorization"] == "Basic dXNlcjpwYXNz"


def test_an_upgrade_through_another_adapter_is_forwarded_without_it(
    mocked: responses.RequestsMock,
) -> None:
    mocked.add(responses.GET, UPSTREAM + "/ws", body="no upgrade here", status=426)
    response = Client(forwarder()).get(
        "/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket"}
    )
    assert response.status_code == 426
    headers = sent(mocked).headers
    assert "Upgrade" not in headers and "Connection" not in headers


# -- the response ------------------------------------------------------------------


def test_repeated_set_cookie_stays_separate_and_hop_by_hop_is_dropped(
    mocked: responses.RequestsMock,
) -> None:
    mocked.add(
        responses.GET,
        UPSTREAM + "/login",
        body="welcome",
        headers=[  # type: ignore[arg-type]  # responses takes a list of pairs too
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/"),
            ("Connection", "X-Hop"),
            ("X-Hop", "listed in Connection"),
            ("Keep-Alive", "timeout=5"),
            ("Date", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ("Server", "upstream/1.0"),
            ("X-Kept", "yes"),
        ],
    )
    response = Client(forwarder(), use_cookies=False).get("/login")
    assert response.status_code == 200 and response.data == b"welcome"
    assert response.headers.getlist("Set-Cookie") == [
        "a=1; Path=/",
        "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/",
    ]
    for name in ("Connection", "X-Hop", "Keep-Alive", "Date", "Server"):
        assert name not in response.headers, name
    assert response.headers["X-Kept"] == "yes"


@pytest.mark.parametrize(("status", "reason"), [(201, "Created"), (404, "Not Found"), (418, "")])
def test_status_is_relayed(mocked: responses.RequestsMock, status: int, reason: str) -> None:
    mocked.add(responses.GET, UPSTREAM + "/", body="x", status=status)
    response = Client(forwarder()).get("/")
    assert response.status_code == status


def test_a_redirect_is_relayed_not_followed(mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.GET,
        UPSTREAM + "/old",
        status=302,
        body="see /new",
        headers={"Location": "/new"},
    )
    response = Client(forwarder()).get("/old")
    assert (response.status_code, response.headers["Location"], response.data) == (
        302,
        "/new",
        b"see /new",
    )
    assert len(mocked.calls) == 1


def test_a_compressed_body_passes_undecoded(mocked: responses.RequestsMock) -> None:
    small = gzip.compress(b"hello " * 100)
    big = gzip.compress(bytes(range(256)) * 2048, compresslevel=0)  # over the small-body size
    for path, body in (("/small", small), ("/big", big)):
        mocked.add(
            responses.GET,
            UPSTREAM + path,
            body=body,
            headers={"Content-Encoding": "gzip", "Content-Length": str(len(body))},
        )
        response = Client(forwarder()).get(path)
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(body))
        assert response.get_data() == body


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_answers_without_a_body_relay_none(
    mocked: responses.RequestsMock, method: str, status: int
) -> None:
    """Whatever the adapter's raw would give (here bytes it should never have read)."""
    mocked.add(
        method, UPSTREAM + "/", status=status, body=b"never relayed", headers={"X-Kept": "1"}
    )
    response = Client(forwarder()).open("/", method=method)
    assert response.status_code == status and response.data == b""
    assert response.headers["X-Kept"] == "1"


# -- failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (requests.ConnectionError("refused"), "502 Bad Gateway", "refused"),
        (requests.exceptions.SSLError("certificate verify failed"), "502 Bad Gateway", "verify"),
        (requests.ConnectTimeout(), "504 Gateway Timeout", "connect timed out"),
        (requests.ReadTimeout(), "504 Gateway Timeout", "timed out waiting"),
    ],
)
def test_upstream_errors_map_to_502_or_504_with_a_generic_body(
    mocked: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    status: str,
    reason: str,
) -> None:
    mocked.add(responses.GET, UPSTREAM + "/fail", body=error)
    with caplog.at_level(logging.WARNING, logger="authproxy.forwarder"):
        response = Client(forwarder()).get("/fail?token=secret")
    assert response.status == status
    assert response.data == status.split(" ", 1)[1].encode() + b"\n"
    assert response.headers["Cache-Control"] == "no-store"
    messages = [r.getMessage() for r in caplog.records if r.name == "authproxy.forwarder"]
    assert any("GET /fail:" in m and reason in m for m in messages), messages
    assert not any("secret" in m for m in messages)


def test_a_small_body_cut_short_is_a_502(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.GET, UPSTREAM + "/", body=b"0123456789", headers={"Content-Length": "100"})
    response = Client(forwarder()).get("/")
    assert (response.status_code, response.data) == (502, b"Bad Gateway\n")


def test_a_large_body_cut_short_aborts_instead_of_ending_early(
    mocked: responses.RequestsMock,
) -> None:
    body = b"x" * (256 * 1024)
    mocked.add(
        responses.GET, UPSTREAM + "/", body=body, headers={"Content-Length": str(len(body) + 1)}
    )
    response = Client(forwarder()).get("/")
    assert response.status_code == 200  # the head went out before the body broke off
    with pytest.raises(Exception, match="upstream body failed"):
        response.get_data()
