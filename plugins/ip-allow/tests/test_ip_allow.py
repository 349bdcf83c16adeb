"""ip-allow through the full pipeline under a real gunicorn, plus its option checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests

from authproxy import ConfigError, build_app
from tests.support import TOKEN, Proxy, Upstream, assert_no_secret


def stack(
    upstream: Upstream, access_log: dict[str, Any], ip_allow: dict[str, Any]
) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream.url},
        "pipeline": [
            {"use": "access-log", "format": "json", **access_log},
            {"use": "ip-allow", **ip_allow},
            {"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}},
        ],
    }


def get(proxy: Proxy, path: str, **headers: str) -> requests.Response:
    response = requests.get(proxy.url + path, headers=headers, timeout=30)
    assert_no_secret(response)
    return response


def test_allow_and_deny_lists_behind_a_trusted_proxy(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    # The access log trusts loopback (its default), so X-Forwarded-For from
    # this test, which connects from 127.0.0.1, is believed.
    proxy = start_proxy(stack(upstream, {}, {"allow": ["10.0.0.0/8"], "deny": ["10.66.0.0/16"]}))
    assert get(proxy, "/direct").status_code == 403  # 127.0.0.1 is not in allow
    assert get(proxy, "/inside", **{"X-Forwarded-For": "10.1.2.3"}).status_code == 200
    assert get(proxy, "/denied", **{"X-Forwarded-For": "10.66.0.9"}).status_code == 403
    # A client cannot claim an allowed address: the trusted proxy appends the
    # real one, and the nearest untrusted hop is the client.
    spoof = get(proxy, "/spoof", **{"X-Forwarded-For": "10.1.2.3, 192.0.2.7"})
    assert spoof.status_code == 403 and spoof.text == "Forbidden\n"
    proxy.stop()
    assert [s.target for s in upstream.seen] == ["/inside"]
    assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"
    lines = {line["path"]: line for line in proxy.access_lines()}
    assert (lines["/direct"]["client"], lines["/direct"]["refusal"]) == (
        "127.0.0.1",
        "address not allowed: not in allow",
    )
    assert (lines["/inside"]["client"], lines["/inside"]["refusal"]) == ("10.1.2.3", None)
    assert lines["/denied"]["refusal"] == "address denied: in deny list"
    assert lines["/denied"]["status"] == 403
    assert lines["/spoof"]["client"] == "192.0.2.7"


def test_follows_the_access_logs_trusted_proxy_setting(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    # The access log trusts no proxy: the forwarded header means nothing, to
    # the log and to ip-allow alike.
    proxy = start_proxy(stack(upstream, {"trusted_proxies": []}, {"allow": ["10.0.0.0/8"]}))
    assert get(proxy, "/x", **{"X-Forwarded-For": "10.1.2.3"}).status_code == 403
    # ... and a log that believes Cf-Connecting-Ip makes ip-allow believe it too.
    proxy2 = start_proxy(
        stack(upstream, {"client_ip_header": "Cf-Connecting-Ip"}, {"allow": ["10.0.0.0/8"]})
    )
    assert get(proxy2, "/y", **{"Cf-Connecting-Ip": "10.9.9.9"}).status_code == 200
    assert get(proxy2, "/z", **{"X-Forwarded-For": "10.9.9.9"}).status_code == 403
    proxy.stop()
    proxy2.stop()
    assert proxy.access_lines()[0]["client"] == "127.0.0.1"
    assert [line["client"] for line in proxy2.access_lines()] == ["10.9.9.9", "127.0.0.1"]


def test_own_settings_without_an_access_log(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    config = stack(
        upstream,
        {},
        {
            "deny": ["192.0.2.0/24"],
            "trusted_proxies": ["127.0.0.1/32"],
            "client_ip_header": "Cf-Connecting-Ip",
            "status": 404,
        },
    )
    config["pipeline"] = config["pipeline"][1:]  # no access log
    proxy = start_proxy(config)
    assert get(proxy, "/a", **{"Cf-Connecting-Ip": "192.0.2.1"}).status_code == 404
    assert get(proxy, "/b", **{"Cf-Connecting-Ip": "198.51.100.1"}).status_code == 200
    assert get(proxy, "/c").status_code == 200  # 127.0.0.1, not denied
    assert [s.target for s in upstream.seen] == ["/b", "/c"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "(ip-allow).allow: set allow, deny or both"),
        ({"allow": ["10.0.0.300/8"]}, "(ip-allow).allow: expected CIDR networks"),
        ({"allow": "10.0.0.0/8"}, "(ip-allow).allow: expected list[str] | None, got '10.0.0.0/8'"),
        ({"deny": ["bogus"]}, "(ip-allow).deny: expected CIDR networks"),
        ({"deny": ["10.0.0.0/8"], "trusted_proxies": ["x"]}, "(ip-allow).trusted_proxies"),
        ({"deny": ["10.0.0.0/8"], "status": 200}, "(ip-allow).status: expected an error status"),
        ({"deny": ["10.0.0.0/8"], "client_ip_header": "a b"}, "(ip-allow).client_ip_header"),
    ],
)
def test_option_errors(upstream: Upstream, options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_app({"upstream": {"url": upstream.url}, "pipeline": [{"use": "ip-allow", **options}]})
    assert expected in str(caught.value)
