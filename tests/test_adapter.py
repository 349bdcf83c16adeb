"""The transport adapter (authproxy/upstream/adapter.py) against a real loopback upstream,
used as requests users use adapters, and the forwarder honouring a session of the user's."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter
from werkzeug.test import Client

from authproxy import Forwarder
from authproxy.upstream.adapter import UpstreamAdapter, UpstreamResponse
from authproxy.upstream.transport import Response

from .support import Upstream, free_port


@pytest.fixture
def session() -> Any:
    session = requests.Session()
    session.trust_env = False
    adapter = UpstreamAdapter(pool_size=4)
    session.mount("http://", adapter)
    yield session
    session.close()


def prepared(url: str, **headers: str) -> requests.PreparedRequest:
    request = requests.PreparedRequest()
    request.method = "GET"
    request.url = url
    request.headers = headers  # type: ignore[assignment]
    request.body = None
    return request


def test_the_target_and_headers_go_out_exactly_as_given(
    session: requests.Session, upstream: Upstream
) -> None:
    target = "/a%2Fb/%7e/%zz?q=%41&x=1+2"
    adapter = session.get_adapter(upstream.url)
    request = prepared(upstream.url + target, Host="upstream.test", **{"X-One": "1"})
    response = adapter.send(request, stream=True, timeout=(5, 5))
    assert isinstance(response.raw, Response)
    assert response.status_code == 200 and response.content == b"ok"
    seen = upstream.last()
    assert seen.target == target  # not re-encoded
    assert seen.header_names() == {"host", "x-one"}  # nothing added
    assert seen.header("Host") == "upstream.test"


def test_repeated_fields_stay_apart_in_raw_and_requests_view_works(
    session: requests.Session, upstream: Upstream
) -> None:
    response = session.get(upstream.url + "/cookies")  # through Session.send: stream=False
    assert isinstance(response, UpstreamResponse)
    assert response.content == b"ok"
    raw = [v for k, v in response.raw.headers if k.lower() == "set-cookie"]
    assert raw == ["a=1; Path=/", "b=2, c=3"]
    assert response.headers["set-cookie"] == "a=1; Path=/, b=2, c=3"  # requests' merged view
    assert response.cookies.get("a") == "1"


def test_the_response_has_every_attribute_requests_gives_one(
    session: requests.Session, upstream: Upstream
) -> None:
    """UpstreamResponse skips requests.Response.__init__: it must set all it sets."""
    response = session.get(upstream.url + "/")
    for name in vars(requests.Response()):
        assert hasattr(response, name), name
    assert response.encoding is None or isinstance(response.encoding, str)
    assert response.elapsed.total_seconds() >= 0  # Session.send sets it
    assert response.url == upstream.url + "/"
    response.close()


def test_the_pool_comes_from_get_connection_with_tls_context_once_per_origin(
    upstream: Upstream,
) -> None:
    calls: list[str] = []

    class Counting(UpstreamAdapter):
        def get_connection_with_tls_context(self, request: Any, *args: Any, **kw: Any) -> Any:
            calls.append(request.url)
            return super().get_connection_with_tls_context(request, *args, **kw)

    session = requests.Session()
    session.trust_env = False  # the same settings on every call, whatever the environment
    session.mount("http://", Counting())
    try:
        # Two settings (timeouts are part of the key), taken in turn.
        for path in ("/a", "/b", "/c"):
            for timeout in (5.0, 6.0):
                assert session.get(upstream.url + path, timeout=timeout).status_code == 200
        assert calls == [upstream.url + "/a"] * 2
    finally:
        session.close()


def test_failures_are_requests_exceptions_that_say_why(
    session: requests.Session, upstream: Upstream
) -> None:
    with pytest.raises(requests.ConnectionError, match="connection refused"):
        session.get(f"http://127.0.0.1:{free_port()}/")
    assert session.get(upstream.url + "/", timeout=(5, 30)).status_code == 200
    with pytest.raises(requests.ReadTimeout, match="timed out"):  # same origin, its own timeout
        session.get(upstream.url + "/sleep/3", timeout=(5, 0.3))


# -- the forwarder and a session of the user's ---------------------------------------


class Signer(requests.auth.AuthBase):
    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["X-Signature"] = f"signed {request.method} {request.url}"
        return request


def test_a_session_with_its_own_auth_gets_the_fast_adapter_and_signs(
    upstream: Upstream,
) -> None:
    session = requests.Session()  # requests' default adapters only
    session.auth = Signer()
    app = Forwarder(upstream.url, session=session)
    assert isinstance(session.get_adapter(upstream.url + "/x"), UpstreamAdapter)
    target = "/p%2Fq?x=%7e"
    response = Client(app).get("/ignored", environ_overrides={"RAW_URI": target})
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.target == target
    assert seen.header("X-Signature") == f"signed GET {upstream.url}{target}"
    app.close()
    assert session.get(upstream.url + "/after").status_code == 200  # still the user's, open
    session.close()


def test_a_plain_adapter_of_the_users_is_used_as_it_is(upstream: Upstream) -> None:
    session = requests.Session()
    adapter = HTTPAdapter()
    session.mount(upstream.url + "/", adapter)
    app = Forwarder(upstream.url, session=session)
    assert session.get_adapter(upstream.url + "/x") is adapter
    response = Client(app, use_cookies=False).get("/cookies", headers={"User-Agent": "ua/1"})
    assert response.status_code == 200 and response.data == b"ok"
    assert response.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2, c=3"]
    seen = upstream.last()
    assert seen.header("User-Agent") == "ua/1"
    big = Client(app).get("/bytes/300000")
    assert len(big.get_data()) == 300000
    Client(app).get("/", environ_overrides={"HTTP_USER_AGENT": ""})
    assert upstream.last().header("User-Agent") in (None, "")  # urllib3 added none
    assert upstream.last().header("Accept-Encoding") is None
    session.close()


def test_requests_to_two_origins_through_one_adapter_each_reach_their_own(
    session: requests.Session, upstream: Upstream
) -> None:
    other = Upstream().start()
    try:
        timeout = (5.0, 5.0)
        for _ in range(2):
            for server in (upstream, other, other, upstream):
                session.get(server.url + "/which", timeout=timeout)
        assert len(upstream.seen) == 4 and len(other.seen) == 4
        # An origin whose URL is a prefix of the next one's ("...:4123", "...:41234").
        shorter = f"http://127.0.0.1:{upstream.port // 10}"
        with pytest.raises(requests.ConnectionError):
            session.get(shorter + "/", timeout=timeout)
        assert session.get(upstream.url + "/which", timeout=timeout).status_code == 200
        assert len(upstream.seen) == 5
    finally:
        other.stop()
