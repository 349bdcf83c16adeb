"""The identity step in the real proxy: gunicorn, access log, identity, token injection.

The upstream records every request, so "refused" means the upstream got
nothing at all, least of all the injected ``Authorization``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from .conftest import identity_config
from .jwks import (
    JwksServer,
    SigningKey,
    claims,
    hs256_with,
    service_claims,
    tampered,
    unsigned,
)
from .support import TOKEN, Proxy, Upstream, assert_no_secret

HEADER = "Cf-Access-Jwt-Assertion"


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Upstream, JwksServer, Proxy]]:
    """One proxy for the per-token cases: any example.com address, or the ci-bot service token."""
    upstream = Upstream().start()
    jwks = JwksServer([SigningKey("RSA")]).start()
    proxy = Proxy(
        identity_config(
            upstream,
            jwks.url,
            allow_email_domains=["example.com"],
            allow_service_tokens=["ci-bot.access"],
        )
    )
    yield upstream, jwks, proxy
    proxy.stop()
    jwks.stop()
    upstream.stop()
    assert TOKEN not in proxy.logs(), "the injected token reached the proxy's log"


def send(proxy: Proxy, path: str = "/", token: str | None = None, **headers: str) -> Any:
    """GET through the proxy with a fresh request id; returns (response, request id)."""
    request_id = secrets.token_hex(8)
    headers["X-Request-ID"] = request_id
    if token is not None:
        headers[HEADER] = token
    response = requests.get(proxy.url + path, headers=headers, timeout=30)
    assert_no_secret(response)
    return response, request_id


def _now() -> int:
    return int(time.time())


# -- per-token cases through the shared proxy -------------------------------------------

ACCEPTED: dict[str, Callable[[SigningKey], dict[str, str]]] = {
    "valid header": lambda k: {HEADER: k.sign(claims())},
    "valid cookie": lambda k: {"Cookie": f"CF_Authorization={k.sign(claims())}"},
    "service token allowed": lambda k: {HEADER: k.sign(service_claims("ci-bot.access"))},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_requests_reach_the_upstream_with_the_identity(
    shared: tuple[Upstream, JwksServer, Proxy], case: str
) -> None:
    upstream, jwks, proxy = shared
    key = jwks.keys[0]
    spoofed = {
        "X-Auth-Request-Email": "root@example.com",
        "X-Auth-Request-User": "root",
        "Cf-Access-Authenticated-User-Email": "root@example.com",
    }
    response, request_id = send(proxy, "/who", **ACCEPTED[case](key), **spoofed)
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.header("X-Request-Id") == request_id
    assert seen.header("Authorization") == f"Bearer {TOKEN}"
    assert seen.header("Cf-Access-Authenticated-User-Email") is None
    if case == "service token allowed":
        assert seen.header("X-Auth-Request-Email") is None
        assert seen.header("X-Auth-Request-User") == "ci-bot.access"
        expected_identity = "ci-bot.access"
    else:
        assert seen.header("X-Auth-Request-Email") == "alice@example.com"
        assert seen.header("X-Auth-Request-User") == "alice@example.com"
        expected_identity = "alice@example.com"
    line = proxy.access_line(request_id=request_id)
    assert (line["status"], line["identity"], line["refusal"]) == (200, expected_identity, None)


REFUSED: dict[str, tuple[Callable[[SigningKey, SigningKey], dict[str, str]], int, str]] = {
    "missing": (lambda k, o: {}, 401, "no identity token"),
    "expired": (lambda k, o: {HEADER: k.sign(claims(exp=_now() - 3600))}, 403, "token expired"),
    "nbf in the future": (
        lambda k, o: {HEADER: k.sign(claims(nbf=_now() + 3600))},
        403,
        "token not yet valid (nbf/iat in the future)",
    ),
    "wrong aud": (lambda k, o: {HEADER: k.sign(claims(aud=["x"]))}, 403, "wrong audience"),
    "wrong iss": (
        lambda k, o: {HEADER: k.sign(claims(iss="https://evil.cloudflareaccess.com"))},
        403,
        "wrong issuer",
    ),
    "alg none": (lambda k, o: {HEADER: unsigned(claims(), k.kid)}, 403, "algorithm not allowed"),
    "HS256 keyed with the public key": (
        lambda k, o: {HEADER: hs256_with(k.public_pem(), claims(), k.kid)},
        403,
        "algorithm not allowed",
    ),
    "unknown kid": (lambda k, o: {HEADER: o.sign(claims())}, 403, "unknown key id"),
    "tampered payload": (
        lambda k, o: {HEADER: tampered(k.sign(claims(email="e@evil.com")), email="a@example.com")},
        403,
        "bad signature",
    ),
    "policy refusal": (
        lambda k, o: {HEADER: k.sign(claims(email="eve@evil.com"))},
        403,
        "not allowed by policy: eve@evil.com",
    ),
    "service token refused": (
        lambda k, o: {HEADER: k.sign(service_claims("other-bot.access"))},
        403,
        "not allowed by policy: other-bot.access",
    ),
    "CR/LF in a claim": (
        lambda k, o: {HEADER: k.sign(claims(email="alice@example.com\r\nX-Evil: 1"))},
        403,
        "claim 'email' holds a control character",
    ),
    "cookie with a bad token": (
        lambda k, o: {"Cookie": f"CF_Authorization={o.sign(claims())}"},
        403,
        "unknown key id",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_requests_never_reach_the_upstream(
    shared: tuple[Upstream, JwksServer, Proxy], other_key: SigningKey, case: str
) -> None:
    upstream, jwks, proxy = shared
    build, status, reason = REFUSED[case]
    headers = build(jwks.keys[0], other_key)
    before = len(upstream.seen)
    response, request_id = send(proxy, "/secret", **headers)
    assert response.status_code == status
    assert response.text in ("Unauthorized\n", "Forbidden\n")
    # Nothing reached the upstream: not the request, not the injected Authorization.
    assert len(upstream.seen) == before
    line = proxy.access_line(request_id=request_id)
    assert (line["status"], line["refusal"], line["identity"]) == (status, reason, None)
    logs = proxy.logs()
    for value in headers.values():
        token = value.removeprefix("CF_Authorization=")
        assert token not in logs, "a client token reached the log"


def test_health_needs_no_identity(shared: tuple[Upstream, JwksServer, Proxy]) -> None:
    upstream, _jwks, proxy = shared
    before = len(upstream.seen)
    response, _ = send(proxy, "/healthz")
    assert response.status_code == 200
    assert len(upstream.seen) == before


# -- keys over time: one proxy each ---------------------------------------------------


@pytest.fixture
def jwks(key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([key]) as server:
        yield server


#: No scheduled refresh and one unknown-kid refetch per hour during a test.


def _warm_up(proxy: Proxy, upstream: Upstream, key: SigningKey) -> None:
    """One accepted request: the worker has built its pipeline (and fetched its keys)."""
    response, _ = send(proxy, token=key.sign(claims(jti="warm-up")))
    assert response.status_code == 200
    assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"


@pytest.fixture
def warm_proxy(
    start_proxy: Callable[..., Proxy], upstream: Upstream, jwks: JwksServer, key: SigningKey
) -> Proxy:
    """A proxy that fetches keys at most once an hour, past its first accepted request."""
    hourly = {"keys_min_refetch_interval": 3600, "keys_refresh_interval": 3600}
    proxy = start_proxy(identity_config(upstream, jwks.url, **hourly))
    _warm_up(proxy, upstream, key)
    return proxy


def test_rotated_key_is_accepted_after_one_refetch(
    warm_proxy: Proxy, upstream: Upstream, jwks: JwksServer, other_key: SigningKey
) -> None:
    proxy = warm_proxy
    baseline = jwks.hits
    jwks.rotate(other_key)
    response, _ = send(proxy, token=other_key.sign(claims()))
    assert response.status_code == 200
    assert upstream.last().header("X-Auth-Request-Email") == "alice@example.com"
    assert jwks.hits == baseline + 1


def test_a_flood_of_unknown_kids_is_rate_limited(
    warm_proxy: Proxy, upstream: Upstream, jwks: JwksServer, other_key: SigningKey
) -> None:
    proxy = warm_proxy
    baseline, forwarded = jwks.hits, len(upstream.seen)

    def junk(i: int) -> int:
        token = other_key.sign(claims(jti=str(i)), kid=secrets.token_hex(8))
        response, _ = send(proxy, token=token)
        return int(response.status_code)

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(junk, range(40)))
    assert statuses == [403] * 40
    # One refetch for the first unknown kid, then none for an hour.
    assert jwks.hits == baseline + 1
    assert len(upstream.seen) == forwarded


def test_key_endpoint_down_after_warm_up_still_accepts(
    start_proxy: Callable[..., Proxy], upstream: Upstream, jwks: JwksServer, key: SigningKey
) -> None:
    proxy = start_proxy(
        identity_config(
            upstream,
            jwks.url,
            keys_refresh_interval=0.3,
            keys_min_refetch_interval=0.3,
            token_cache_size=0,  # verify every time: the keys themselves must survive
        )
    )
    _warm_up(proxy, upstream, key)
    jwks.set_mode("error")
    jwks.wait_for_hits(jwks.hits + 2)  # at least two failed refreshes
    response, _ = send(proxy, token=key.sign(claims(jti="during the outage")))
    assert response.status_code == 200
    assert upstream.last().header("X-Auth-Request-Email") == "alice@example.com"
    proxy.logs(until="keeping the last good set")


def test_key_endpoint_down_from_the_start_refuses_but_health_answers(
    start_proxy: Callable[..., Proxy], upstream: Upstream, jwks: JwksServer, key: SigningKey
) -> None:
    jwks.set_mode("error")
    proxy = start_proxy(identity_config(upstream, jwks.url))
    response, request_id = send(proxy, token=key.sign(claims()))
    assert response.status_code == 403
    assert upstream.seen == []
    assert proxy.access_line(request_id=request_id)["refusal"] == "no signing keys"
    health, _ = send(proxy, "/healthz")
    assert health.status_code == 200
    # Not ready while it can only refuse: Kubernetes routes no traffic to it.
    ready, _ = send(proxy, "/readyz")
    assert ready.status_code == 503
    assert upstream.seen == []
    proxy.logs(until="no keys, refusing every request")
