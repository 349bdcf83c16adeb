"""The identity step around a tiny WSGI app: real keys, real signed tokens, a real key endpoint."""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from werkzeug.test import Client

from authproxy import ConfigError, VerifiedIdentity, build_app
from authproxy.middleware.identity import Identity
from authproxy.middleware.identity.providers import PROVIDERS

from .jwks import (
    AUDIENCE,
    DROP,
    ISSUER,
    TEAM_DOMAIN,
    JwksServer,
    SigningKey,
    claims,
    hs256_with,
    service_claims,
    tampered,
    unsigned,
)

HEADER = "Cf-Access-Jwt-Assertion"


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("RSA")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    """A real key that the endpoint does not publish (until a test rotates to it)."""
    return SigningKey("RSA")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey("EC")


@pytest.fixture
def jwks(rsa_key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([rsa_key]) as server:
        yield server


class Echo:
    """The protected app: records what reached it and answers 200."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.calls.append(dict(environ))
        identity = environ.get("authproxy.identity")
        body = json.dumps({"email": identity.email if identity else None}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    @property
    def last(self) -> dict[str, Any]:
        assert self.calls, "the protected app was not called"
        return self.calls[-1]


class Stack:
    """Identity around an Echo, with the environ each request ended with."""

    def __init__(self, identity: Identity, echo: Echo) -> None:
        self.identity = identity
        self.echo = echo
        self.environ: dict[str, Any] = {}
        self.client = Client(self._outer, use_cookies=False)

    def _outer(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.environ = environ
        return self.identity(environ, start_response)

    def get(self, token: str | None = None, path: str = "/", **headers: str) -> Any:
        if token is not None:
            headers[HEADER] = token
        return self.client.get(path, headers=headers)

    @property
    def refusal(self) -> str | None:
        return self.environ.get("authproxy.refusal")


@pytest.fixture
def make(jwks: JwksServer) -> Iterator[Callable[..., Stack]]:
    built: list[Identity] = []

    def make(**options: Any) -> Stack:
        options.setdefault("team_domain", TEAM_DOMAIN)
        options.setdefault("audience", AUDIENCE)
        options.setdefault("certs_url", jwks.url)
        echo = Echo()
        identity = Identity(echo, **options)
        built.append(identity)
        return Stack(identity, echo)

    yield make
    for identity in built:
        identity.close()


@pytest.fixture
def issued(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Tokens a test made; none of them may appear in a log record."""
    tokens: list[str] = []
    yield tokens
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    for token in tokens:
        assert token not in text, "a token reached the log"


# -- accepted -------------------------------------------------------------------------


def test_valid_header_passes_and_hands_over_the_identity(
    make: Callable[..., Stack], rsa_key: SigningKey, issued: list[str]
) -> None:
    stack = make()
    token = rsa_key.sign(claims())
    issued.append(token)
    response = stack.get(token)
    assert response.status_code == 200
    identity = stack.echo.last["authproxy.identity"]
    assert isinstance(identity, VerifiedIdentity)
    assert identity.email == "alice@example.com"
    assert identity.subject == "7335d417-61da-459d-899c-0a01c76a2f94"
    assert identity.issuer == ISSUER
    assert identity.claims["country"] == "US"
    assert stack.echo.last["HTTP_X_AUTH_REQUEST_EMAIL"] == "alice@example.com"
    assert stack.echo.last["HTTP_X_AUTH_REQUEST_USER"] == "alice@example.com"
    assert stack.refusal is None


def test_valid_cookie_passes(make: Callable[..., Stack], rsa_key: SigningKey) -> None:
    stack = make()
    response = stack.get(Cookie=f"other=1; CF_Authorization={rsa_key.sign(claims())}")
    assert response.status_code == 200
    assert stack.echo.last["authproxy.identity"].email == "alice@example.com"


def test_cookie_can_be_switched_off(make: Callable[..., Stack], rsa_key: SigningKey) -> None:
    stack = make(cookie=False)
    response = stack.get(Cookie=f"CF_Authorization={rsa_key.sign(claims())}")
    assert response.status_code == 401
    assert not stack.echo.calls


# -- one verified token ----------------------------------------------------------------

CONFLICT_HEADER = (
    "conflicting access tokens: the Cf-Access-Jwt-Assertion header and the CF_Authorization"
    " cookie differ"
)


@pytest.mark.parametrize("valid_in", ["header", "cookie"])
def test_a_header_and_a_cookie_that_differ_are_refused(
    make: Callable[..., Stack], rsa_key: SigningKey, other_key: SigningKey, valid_in: str
) -> None:
    stack = make()
    good = rsa_key.sign(claims())
    forged = other_key.sign(claims(email="root@example.com"))
    header, cookie = (good, forged) if valid_in == "header" else (forged, good)
    response = stack.get(header, Cookie=f"CF_Authorization={cookie}")
    assert response.status_code == 401
    assert response.get_data() == b"Unauthorized\n"
    assert stack.refusal == CONFLICT_HEADER
    assert not stack.echo.calls
    # Two valid tokens that differ conflict all the same.
    other_good = rsa_key.sign(claims(email="bob@example.com"))
    assert stack.get(good, Cookie=f"CF_Authorization={other_good}").status_code == 401
    assert not stack.echo.calls


@pytest.mark.parametrize(
    "cookie",
    [
        "CF_Authorization={good}; CF_Authorization={forged}",
        "CF_Authorization={forged}; CF_Authorization={good}",
        "a=1; CF_Authorization={good}; b=2; cf_authorization={forged}",
        'CF_Authorization={good}; CF_Authorization="{forged}"',
    ],
)
def test_two_different_cookies_are_refused(
    make: Callable[..., Stack], rsa_key: SigningKey, other_key: SigningKey, cookie: str
) -> None:
    stack = make()
    good, forged = rsa_key.sign(claims()), other_key.sign(claims(email="root@example.com"))
    response = stack.get(Cookie=cookie.format(good=good, forged=forged))
    assert response.status_code == 401
    assert stack.refusal == "conflicting access tokens: 2 different CF_Authorization cookies"
    assert not stack.echo.calls
    # With the valid token in the header as well: still refused.
    assert stack.get(good, Cookie=cookie.format(good=good, forged=forged)).status_code == 401
    assert not stack.echo.calls


def test_a_cookie_hidden_after_a_comma_is_refused(
    make: Callable[..., Stack], rsa_key: SigningKey, other_key: SigningKey
) -> None:
    # What gunicorn makes of two Cookie headers: "a=1,CF_Authorization=...".
    stack = make()
    good, forged = rsa_key.sign(claims()), other_key.sign(claims())
    for cookie in (f"a=1,CF_Authorization={forged}", f"a=1, CF_Authorization={good}"):
        assert stack.get(good, Cookie=cookie).status_code == 401
        assert stack.refusal == "conflicting access tokens: a CF_Authorization cookie after a comma"
    assert not stack.echo.calls


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        # One copy: the header is left byte for byte.
        ('a=1;b=2; CF_Authorization={t};  c="x y"', 'a=1;b=2; CF_Authorization={t};  c="x y"'),
        ("CF_Authorization={t}", "CF_Authorization={t}"),
        # Identical copies: the first stays, the rest go with their separators.
        (
            'a=1;b=2; CF_Authorization={t};  c="x y"; CF_Authorization={t}',
            'a=1;b=2; CF_Authorization={t};  c="x y"',
        ),
        ("CF_Authorization={t};CF_Authorization={t};z=9", "CF_Authorization={t};z=9"),
        ("CF_Authorization=; a=1; CF_Authorization={t}", "a=1; CF_Authorization={t}"),
        ("x=1; cf_authorization={t}; CF_Authorization={t}", "x=1; cf_authorization={t}"),
    ],
)
def test_the_upstream_gets_one_copy_and_every_other_cookie_untouched(
    make: Callable[..., Stack], rsa_key: SigningKey, sent: str, forwarded: str
) -> None:
    stack = make()
    token = rsa_key.sign(claims())
    for header in (None, token):  # from the cookie alone, and with the header too
        response = stack.get(header, Cookie=sent.format(t=token))
        assert response.status_code == 200, stack.refusal
        assert stack.echo.last["HTTP_COOKIE"] == forwarded.format(t=token)


def test_a_header_with_an_identical_cookie_passes(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make()
    token = rsa_key.sign(claims())
    assert stack.get(token, Cookie=f"CF_Authorization={token}; s=1").status_code == 200
    assert stack.echo.last["HTTP_COOKIE"] == f"CF_Authorization={token}; s=1"
    assert stack.echo.last["HTTP_CF_ACCESS_JWT_ASSERTION"] == token
    # Other cookies alone never conflict with the header.
    assert stack.get(token, Cookie="session=abc; theme=dark").status_code == 200
    assert stack.echo.last["HTTP_COOKIE"] == "session=abc; theme=dark"


def test_the_rule_holds_for_any_header_and_cookie_pair(
    make: Callable[..., Stack], rsa_key: SigningKey, other_key: SigningKey
) -> None:
    stack = make(provider="oidc", header="Authorization", cookie="id_token", issuer=ISSUER)
    good, forged = rsa_key.sign(claims()), other_key.sign(claims())
    response = stack.get(Authorization=f"Bearer {good}", Cookie=f"id_token={forged}")
    assert response.status_code == 401
    assert stack.refusal == (
        "conflicting access tokens: the Authorization header and the id_token cookie differ"
    )
    response = stack.get(Authorization=f"Bearer {good}", Cookie=f"id_token={good}; id_token={good}")
    assert response.status_code == 200
    assert stack.echo.last["HTTP_COOKIE"] == f"id_token={good}"


def test_a_cookie_the_step_does_not_read_is_left_alone(
    make: Callable[..., Stack], rsa_key: SigningKey, other_key: SigningKey
) -> None:
    stack = make(cookie=False)
    good, forged = rsa_key.sign(claims()), other_key.sign(claims())
    cookie = f"CF_Authorization={forged}; CF_Authorization={good}"
    assert stack.get(good, Cookie=cookie).status_code == 200
    assert stack.echo.last["HTTP_COOKIE"] == cookie


@pytest.mark.parametrize("token_aud", [[AUDIENCE], AUDIENCE, ["another-app", AUDIENCE]])
def test_audience_list_is_matched_against_the_tokens_aud(
    make: Callable[..., Stack], rsa_key: SigningKey, token_aud: Any
) -> None:
    stack = make(audience=["first-app", AUDIENCE])
    assert stack.get(rsa_key.sign(claims(aud=token_aud))).status_code == 200


# -- refused --------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {HEADER: ""}, {"Cookie": "CF_Authorization="}])
def test_no_token_is_401(make: Callable[..., Stack], headers: dict[str, str]) -> None:
    stack = make()
    response = stack.get(**headers)
    assert response.status_code == 401
    assert response.get_data() == b"Unauthorized\n"
    assert stack.refusal == "no identity token"
    assert not stack.echo.calls


def _now() -> int:
    return int(time.time())


# name -> (token builder, the reason logged)
BAD_TOKENS: dict[str, tuple[Callable[[SigningKey, SigningKey, SigningKey], str], str]] = {
    "expired": (lambda k, o, e: k.sign(claims(exp=_now() - 3600)), "token expired"),
    "nbf in the future": (
        lambda k, o, e: k.sign(claims(nbf=_now() + 3600)),
        "token not yet valid",
    ),
    "iat in the future": (
        lambda k, o, e: k.sign(claims(iat=_now() + 3600)),
        "token not yet valid",
    ),
    "wrong aud": (lambda k, o, e: k.sign(claims(aud=["another-app"])), "wrong audience"),
    "wrong iss": (
        lambda k, o, e: k.sign(claims(iss="https://evil.cloudflareaccess.com")),
        "wrong issuer",
    ),
    "alg none": (lambda k, o, e: unsigned(claims(), k.kid), "algorithm not allowed"),
    "HS256 keyed with the public key": (
        lambda k, o, e: hs256_with(k.public_pem(), claims(), k.kid),
        "algorithm not allowed",
    ),
    "unknown kid": (lambda k, o, e: o.sign(claims()), "unknown key id"),
    "known kid, other key": (lambda k, o, e: o.sign(claims(), kid=k.kid), "bad signature"),
    "tampered payload": (
        lambda k, o, e: tampered(k.sign(claims(email="bob@example.com")), email="root@example.com"),
        "bad signature",
    ),
    "ES256 under an RSA kid": (
        lambda k, o, e: e.sign(claims(), kid=k.kid),
        "algorithm not allowed",
    ),
    "no exp": (lambda k, o, e: k.sign(claims(exp=DROP)), "token lacks the 'exp' claim"),
    "no iat": (lambda k, o, e: k.sign(claims(iat=DROP)), "token lacks the 'iat' claim"),
    "no aud": (lambda k, o, e: k.sign(claims(aud=DROP)), "token lacks the 'aud' claim"),
    "no iss": (lambda k, o, e: k.sign(claims(iss=DROP)), "token lacks the 'iss' claim"),
    "nobody": (lambda k, o, e: k.sign(claims(email=DROP, sub="")), "token names nobody"),
    "garbage": (lambda k, o, e: "not-a-jwt", "malformed token"),
    "empty header and payload": (lambda k, o, e: "e30.e30.e30", "algorithm not allowed"),
    "three dots of garbage": (lambda k, o, e: "!!.??.**", "malformed token"),
    "huge": (lambda k, o, e: "a" * 20000, "token too large"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens_are_403_with_the_reason_logged(
    make: Callable[..., Stack],
    rsa_key: SigningKey,
    other_key: SigningKey,
    ec_key: SigningKey,
    issued: list[str],
    case: str,
) -> None:
    build, reason = BAD_TOKENS[case]
    stack = make()
    token = build(rsa_key, other_key, ec_key)
    issued.append(token)
    response = stack.get(token)
    assert response.status_code == 403
    assert response.get_data() == b"Forbidden\n"
    assert stack.refusal is not None and stack.refusal.startswith(reason)
    assert token not in stack.refusal
    assert not stack.echo.calls


def test_leeway_is_honoured(make: Callable[..., Stack], rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(exp=_now() - 5))
    assert make(leeway=60).get(token).status_code == 200
    assert make(leeway=0).get(token).status_code == 403


# -- hand-off -------------------------------------------------------------------------


def test_spoofed_identity_headers_are_replaced(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make()
    spoofed = {
        "X-Auth-Request-Email": "root@example.com",
        "X-Auth-Request-User": "root",
        "Cf-Access-Authenticated-User-Email": "root@example.com",
    }
    assert stack.get(rsa_key.sign(claims()), **spoofed).status_code == 200
    seen = stack.echo.last
    assert seen["HTTP_X_AUTH_REQUEST_EMAIL"] == "alice@example.com"
    assert seen["HTTP_X_AUTH_REQUEST_USER"] == "alice@example.com"
    assert "HTTP_CF_ACCESS_AUTHENTICATED_USER_EMAIL" not in seen


def test_custom_identity_headers_and_the_defaults_are_still_removed(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make(identity_headers={"X-Remote-User": "email", "X-Remote-Groups": "groups"})
    token = rsa_key.sign(claims(groups=["sre", "admins"]))
    response = stack.get(
        token, **{"X-Remote-User": "root", "X-Auth-Request-Email": "root@example.com"}
    )
    assert response.status_code == 200
    seen = stack.echo.last
    assert seen["HTTP_X_REMOTE_USER"] == "alice@example.com"
    assert seen["HTTP_X_REMOTE_GROUPS"] == "sre,admins"
    assert "HTTP_X_AUTH_REQUEST_EMAIL" not in seen


def test_identity_headers_can_be_switched_off(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make(identity_headers={})
    assert stack.get(rsa_key.sign(claims()), **{"X-Auth-Request-Email": "x@y"}).status_code == 200
    assert "HTTP_X_AUTH_REQUEST_EMAIL" not in stack.echo.last
    assert stack.echo.last["authproxy.identity"].email == "alice@example.com"


@pytest.mark.parametrize(
    "changes, headers",
    [
        ({"email": "alice@example.com\r\nX-Injected: 1"}, None),
        ({"email": "alice@example.com\nX-Injected: 1"}, None),
        ({"email": "alice@example.com\x00"}, None),
        ({"display_name": "Alice\rEvil"}, {"X-Display-Name": "display_name"}),
    ],
)
def test_control_characters_in_a_claim_never_become_a_header(
    make: Callable[..., Stack],
    rsa_key: SigningKey,
    changes: dict[str, str],
    headers: dict[str, str] | None,
) -> None:
    stack = make(identity_headers=headers)
    response = stack.get(rsa_key.sign(claims(**changes)))
    assert response.status_code == 403
    assert stack.refusal is not None and "control character" in stack.refusal
    assert not stack.echo.calls


def test_control_characters_in_an_unused_claim_do_not_matter(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make()
    assert stack.get(rsa_key.sign(claims(name="Alice\r\nEvil"))).status_code == 200


def test_non_ascii_claims_reach_the_upstream_as_utf8(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make()
    assert stack.get(rsa_key.sign(claims(email="jösé@example.com"))).status_code == 200
    # WSGI carries header bytes as latin-1 text.
    sent = stack.echo.last["HTTP_X_AUTH_REQUEST_EMAIL"].encode("latin-1")
    assert sent == "jösé@example.com".encode()


# -- policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, token_claims, allowed",
    [
        ({"allow_emails": ["Alice@Example.com"]}, claims(), True),
        ({"allow_emails": ["bob@example.com"]}, claims(), False),
        ({"allow_email_domains": ["example.com"]}, claims(), True),
        ({"allow_email_domains": ["example.com"]}, claims(email="eve@example.com.evil"), False),
        ({"allow_email_domains": ["example.com"]}, claims(email="eve@sub.example.com"), False),
        ({"allow_claims": {"groups": ["admins"]}}, claims(groups=["sre", "admins"]), True),
        ({"allow_claims": {"groups": "admins"}}, claims(groups="admins"), True),
        ({"allow_claims": {"groups": ["admins"]}}, claims(groups=["sre"]), False),
        ({"allow_claims": {"groups": ["admins"]}}, claims(), False),
        (
            {"allow_emails": ["bob@example.com"], "allow_claims": {"groups": ["sre"]}},
            claims(groups=["sre"]),
            True,
        ),
        ({"allow_emails": ["alice@example.com"]}, claims(email_verified=False), False),
    ],
)
def test_policy(
    make: Callable[..., Stack],
    rsa_key: SigningKey,
    options: dict[str, Any],
    token_claims: dict[str, Any],
    allowed: bool,
) -> None:
    stack = make(**options)
    response = stack.get(rsa_key.sign(token_claims))
    assert response.status_code == (200 if allowed else 403)
    assert bool(stack.echo.calls) == allowed
    if not allowed:
        assert stack.refusal is not None and stack.refusal.startswith("not allowed by policy")


@pytest.mark.parametrize("identity_headers", [None, {}])
def test_a_name_with_control_characters_is_refused_with_any_identity_headers(
    make: Callable[..., Stack], rsa_key: SigningKey, identity_headers: dict[str, str] | None
) -> None:
    stack = make(identity_headers=identity_headers)
    assert stack.get(rsa_key.sign(claims(email="eve@example.com\r\nX: 1"))).status_code == 403
    assert stack.refusal is not None and "control character" in stack.refusal
    assert "\r" not in stack.refusal and not stack.echo.calls


def test_service_token_allowed(make: Callable[..., Stack], rsa_key: SigningKey) -> None:
    stack = make(allow_emails=["alice@example.com"], allow_service_tokens=["ci-bot.access"])
    response = stack.get(
        rsa_key.sign(service_claims("ci-bot.access")), **{"X-Auth-Request-Email": "root@x"}
    )
    assert response.status_code == 200
    identity = stack.echo.last["authproxy.identity"]
    assert identity.service_token == "ci-bot.access" and identity.email is None
    assert stack.echo.last["HTTP_X_AUTH_REQUEST_USER"] == "ci-bot.access"
    assert "HTTP_X_AUTH_REQUEST_EMAIL" not in stack.echo.last


@pytest.mark.parametrize(
    "options",
    [
        {"allow_service_tokens": ["ci-bot.access"]},
        {"allow_emails": ["alice@example.com"]},
        {"allow_email_domains": ["access"]},
    ],
)
def test_service_token_refused(
    make: Callable[..., Stack], rsa_key: SigningKey, options: dict[str, Any]
) -> None:
    stack = make(**options)
    assert stack.get(rsa_key.sign(service_claims("other-bot.access"))).status_code == 403
    assert stack.refusal == "not allowed by policy: other-bot.access"
    assert not stack.echo.calls


def test_service_token_is_a_valid_identity_with_an_open_policy(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make()
    assert stack.get(rsa_key.sign(service_claims("any.access"))).status_code == 200


# -- keys -----------------------------------------------------------------------------


def test_rotated_key_is_accepted_after_one_refetch(
    make: Callable[..., Stack], jwks: JwksServer, rsa_key: SigningKey, other_key: SigningKey
) -> None:
    stack = make()
    old_token = rsa_key.sign(claims())
    assert stack.get(old_token).status_code == 200
    assert jwks.hits == 1  # the start-up fetch, before any request
    jwks.rotate(other_key)
    assert stack.get(other_key.sign(claims())).status_code == 200
    assert jwks.hits == 2
    # The old key is gone: its token, though verified and cached, no longer passes.
    assert stack.get(old_token).status_code == 403
    assert stack.refusal == "unknown key id"


def test_first_fetch_happens_at_construction(make: Callable[..., Stack], jwks: JwksServer) -> None:
    stack = make()
    assert jwks.hits == 1
    assert stack.identity.has_keys()


def test_scheduled_refresh_picks_up_a_rotation(
    make: Callable[..., Stack], jwks: JwksServer, rsa_key: SigningKey, other_key: SigningKey
) -> None:
    stack = make(keys_refresh_interval=0.2, keys_min_refetch_interval=3600)
    jwks.rotate(rsa_key, other_key)
    deadline = time.monotonic() + 30
    while other_key.kid not in stack.identity.keys.kids():
        assert time.monotonic() < deadline, "the rotation was never picked up"
        time.sleep(0.05)
    assert jwks.hits >= 2


@pytest.mark.parametrize("failure", ["error", "garbage", "empty", "not-found", "stall"])
def test_key_endpoint_down_after_warm_up_keeps_the_last_good_set(
    make: Callable[..., Stack],
    jwks: JwksServer,
    rsa_key: SigningKey,
    other_key: SigningKey,
    failure: str,
) -> None:
    stack = make(
        keys_refresh_interval=0.2,
        keys_min_refetch_interval=0.2,
        keys_timeout=1.5,  # room for a loaded machine; a stalled fetch costs this much
        token_cache_size=0,  # verify every time
    )
    assert stack.get(rsa_key.sign(claims())).status_code == 200
    jwks.set_mode(failure)
    jwks.wait_for_hits(jwks.hits + 2)  # two failed refreshes at least
    assert stack.get(rsa_key.sign(claims(jti="fresh"))).status_code == 200
    assert stack.get(other_key.sign(claims())).status_code == 403
    assert stack.refusal == "unknown key id"
    assert stack.identity.has_keys()
    jwks.set_mode("ok")


@pytest.mark.parametrize("failure", ["error", "garbage", "empty", "stall"])
def test_key_endpoint_down_from_the_start_refuses_everyone_then_recovers(
    jwks: JwksServer, make: Callable[..., Stack], rsa_key: SigningKey, failure: str
) -> None:
    jwks.set_mode(failure)
    stack = make(keys_min_refetch_interval=0, keys_timeout=1.5)
    assert not stack.identity.has_keys()
    response = stack.get(rsa_key.sign(claims()))
    assert response.status_code == 403
    assert stack.refusal == "no signing keys"
    assert not stack.echo.calls
    jwks.set_mode("ok")
    assert stack.get(rsa_key.sign(claims())).status_code == 200
    assert stack.identity.has_keys()


def test_a_flood_of_unknown_kids_causes_one_refetch(
    make: Callable[..., Stack], jwks: JwksServer, other_key: SigningKey
) -> None:
    stack = make(keys_min_refetch_interval=3600)
    assert jwks.hits == 1

    def junk(i: int) -> int:
        token = other_key.sign(claims(jti=str(i)), kid=secrets.token_hex(8))
        return int(stack.get(token).status_code)

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(junk, range(60)))
    assert statuses == [403] * 60
    assert jwks.hits == 2


def test_tokens_with_a_bad_alg_never_trigger_a_refetch(
    make: Callable[..., Stack], jwks: JwksServer, rsa_key: SigningKey
) -> None:
    stack = make(keys_min_refetch_interval=0)
    for i in range(5):
        kid = secrets.token_hex(8)
        assert stack.get(unsigned(claims(jti=str(i)), kid)).status_code == 403
        assert stack.get(hs256_with(rsa_key.public_pem(), claims(), kid)).status_code == 403
    assert jwks.hits == 1


# -- the verified-token cache ---------------------------------------------------------


def test_a_reused_token_is_verified_once(make: Callable[..., Stack], rsa_key: SigningKey) -> None:
    stack = make()
    token = rsa_key.sign(claims())
    for _ in range(5):
        assert stack.get(token).status_code == 200
    cache = stack.identity.verifier.cache
    assert (cache.misses, cache.hits) == (1, 4)


def test_a_cached_token_is_not_used_past_its_exp(
    make: Callable[..., Stack], rsa_key: SigningKey
) -> None:
    stack = make(leeway=0)
    exp = _now() + 3
    token = rsa_key.sign(claims(exp=exp))
    assert stack.get(token).status_code == 200
    while time.time() < exp + 0.2:
        time.sleep(0.1)
    assert stack.get(token).status_code == 403
    assert stack.refusal == "token expired"


def test_the_cache_is_bounded(make: Callable[..., Stack], rsa_key: SigningKey) -> None:
    stack = make(token_cache_size=3)
    for i in range(6):
        assert stack.get(rsa_key.sign(claims(jti=str(i)))).status_code == 200
    assert len(stack.identity.verifier.cache) == 3


# -- skipped paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, skipped",
    [
        ("/static/app.js", True),
        ("/favicon.ico", True),
        ("/favicon.ico/x", False),
        ("/staticx", False),
        ("/static/../api/v1/secret", False),
        ("/static/%2e%2e/api/v1/secret", False),
        ("/static/..%2Fapi", False),
        ("/static//etc", False),
        ("/api", False),
    ],
)
def test_skip_paths(make: Callable[..., Stack], path: str, skipped: bool) -> None:
    stack = make(skip_paths=["/static/*", "/favicon.ico"])
    response = stack.get(path=path, **{"X-Auth-Request-Email": "root@example.com"})
    assert response.status_code == (200 if skipped else 401)
    if skipped:
        assert "authproxy.identity" not in stack.echo.last
        assert "HTTP_X_AUTH_REQUEST_EMAIL" not in stack.echo.last


def test_nothing_is_skipped_by_default(make: Callable[..., Stack]) -> None:
    assert make().get(path="/favicon.ico").status_code == 401


# -- other providers ------------------------------------------------------------------


def test_google_iap_preset_with_es256(ec_key: SigningKey, rsa_key: SigningKey) -> None:
    audience = "/projects/123456/apps/my-project"
    iap = {"iss": "https://cloud.google.com/iap", "aud": audience, "email": "carol@example.com"}
    with JwksServer([ec_key, rsa_key]) as server:
        identity = Identity(Echo(), provider="google-iap", audience=audience, certs_url=server.url)
        client = Client(identity, use_cookies=False)
        try:
            header = "X-Goog-Iap-Jwt-Assertion"
            assert client.get("/", headers={header: ec_key.sign(claims(**iap))}).status_code == 200
            # RS256 is not IAP's algorithm, even from a published key.
            assert client.get("/", headers={header: rsa_key.sign(claims(**iap))}).status_code == 403
            assert client.get("/", headers={HEADER: ec_key.sign(claims(**iap))}).status_code == 401
        finally:
            identity.close()


def test_pomerium_preset(ec_key: SigningKey) -> None:
    route = "app.example.com"
    with JwksServer([ec_key]) as server:
        echo = Echo()
        identity = Identity(
            echo, provider="pomerium", team_domain=route, audience=route, certs_url=server.url
        )
        try:
            token = ec_key.sign(claims(iss=route, aud=route))
            response = Client(identity).get("/", headers={"X-Pomerium-Jwt-Assertion": token})
            assert response.status_code == 200
            assert echo.last["authproxy.identity"].email == "alice@example.com"
        finally:
            identity.close()


def test_oidc_generic(ec_key: SigningKey, rsa_key: SigningKey) -> None:
    with JwksServer([ec_key, rsa_key]) as server:
        identity = Identity(
            Echo(),
            provider="oidc",
            header="X-Id-Token",
            cookie="id_token",
            issuer="https://idp.example.com",
            audience="my-client",
            certs_url=server.url,
            algorithms=["RS256", "ES256"],
        )
        client = Client(identity, use_cookies=False)
        try:
            mine = {"iss": "https://idp.example.com", "aud": "my-client"}
            for key in (ec_key, rsa_key):
                token = key.sign(claims(**mine))
                assert client.get("/", headers={"X-Id-Token": token}).status_code == 200
                assert client.get("/", headers={"Cookie": f"id_token={token}"}).status_code == 200
        finally:
            identity.close()


def test_bearer_prefix_is_ignored(rsa_key: SigningKey, jwks: JwksServer) -> None:
    echo = Echo()
    identity = Identity(
        echo,
        provider="oidc",
        header="Authorization",
        issuer=ISSUER,
        audience=AUDIENCE,
        certs_url=jwks.url,
    )
    try:
        token = rsa_key.sign(claims())
        client = Client(identity)
        assert client.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/", headers={"Authorization": token}).status_code == 200
        assert client.get("/", headers={"Authorization": "Bearer "}).status_code == 403
    finally:
        identity.close()


def test_presets_are_data() -> None:
    cloudflare = PROVIDERS["cloudflare-access"]
    assert cloudflare.certs_url == "https://{team_domain}/cdn-cgi/access/certs"
    assert cloudflare.issuer == "https://{team_domain}"
    assert (cloudflare.header, cloudflare.cookie) == ("Cf-Access-Jwt-Assertion", "CF_Authorization")
    for name, preset in PROVIDERS.items():
        assert preset.algorithms, name
        assert not any(a.startswith("HS") or a == "none" for a in preset.algorithms), name


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, key",
    [
        ({"provider": "okta"}, "provider"),
        ({"team_domain": None, "certs_url": None}, "team_domain"),
        ({"team_domain": "https://myteam.cloudflareaccess.com"}, "team_domain"),
        ({"audience": None}, "audience"),
        ({"audience": []}, "audience"),
        ({"audience": [""]}, "audience"),
        ({"algorithms": ["HS256"]}, "algorithms"),
        ({"algorithms": ["none"]}, "algorithms"),
        ({"algorithms": []}, "algorithms"),
        ({"certs_url": "http://keys.example.com/certs"}, "certs_url"),
        ({"certs_url": "ftp://127.0.0.1/certs"}, "certs_url"),
        ({"provider": "oidc", "issuer": "https://idp"}, "header"),
        ({"provider": "oidc", "header": "X-Id-Token"}, "issuer"),
        ({"allow_emails": "alice@example.com"}, "allow_emails"),
        ({"allow_claims": {"groups": [1]}}, "allow_claims.groups"),
        ({"identity_headers": {"Bad Name": "email"}}, "identity_headers.Bad Name"),
        ({"identity_headers": {"X-User": ""}}, "identity_headers.X-User"),
        ({"skip_paths": ["static/*"]}, "skip_paths"),
        ({"leeway": -1}, "leeway"),
        ({"keys_timeout": 0}, "keys_timeout"),
        ({"token_cache_size": -1}, "token_cache_size"),
        ({"cookie": 1}, "cookie"),
        ({"issuer": ""}, "issuer"),
        ({"certs_url": 5}, "certs_url"),
        ({"team_domain": 5}, "team_domain"),
    ],
)
def test_bad_options_fail_at_construction_naming_the_key(
    jwks: JwksServer, options: dict[str, Any], key: str
) -> None:
    full = {"team_domain": TEAM_DOMAIN, "audience": AUDIENCE, "certs_url": jwks.url, **options}
    before = set(threading.enumerate())
    with pytest.raises(ConfigError) as caught:
        Identity(Echo(), **full)
    assert caught.value.key == key
    started = [t.name for t in threading.enumerate() if t not in before]
    assert started == []  # no refresh thread left behind
    assert jwks.hits == 0


def test_pipeline_config_errors_name_the_step(jwks: JwksServer) -> None:
    config = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "pipeline": [{"use": "identity", "team_domain": TEAM_DOMAIN, "certs_url": jwks.url}],
    }
    with pytest.raises(ConfigError) as caught:
        build_app(config)
    assert caught.value.key == "pipeline[0] (identity).audience"


def test_pipeline_builds_identity_from_config(jwks: JwksServer, rsa_key: SigningKey) -> None:
    config = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "pipeline": [
            {
                "use": "identity",
                "team_domain": TEAM_DOMAIN,
                "audience": [AUDIENCE],
                "certs_url": jwks.url,
                "allow_claims": {"groups": ["sre"]},
            }
        ],
    }
    pipeline = build_app(config)
    try:
        assert Client(pipeline).get("/healthz").status_code == 200
        assert Client(pipeline).get("/").status_code == 401
        (_, (name, step)) = pipeline.steps  # after the cross-origin step the builder adds
        assert name == "identity" and step.has_keys()
        assert step.describe()["keys"] == [rsa_key.kid]
    finally:
        pipeline.close()


def test_close_stops_the_refresh_thread(make: Callable[..., Stack]) -> None:
    stack = make()
    thread = stack.identity.keys._thread
    assert thread is not None and thread.is_alive()
    stack.identity.close()
    assert not thread.is_alive()


def test_importing_identity_does_not_import_gunicorn() -> None:
    code = (
        "import sys, authproxy, authproxy.middleware.identity\n"
        "authproxy.Identity\n"
        "assert not [m for m in sys.modules if m.startswith('gunicorn')], 'gunicorn imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_refusals_log_nothing_but_the_reason(
    make: Callable[..., Stack],
    rsa_key: SigningKey,
    other_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stack = make()
    tokens = [rsa_key.sign(claims(exp=_now() - 3600)), other_key.sign(claims()), "x.y.z"]
    for token in tokens:
        assert stack.get(token).status_code == 403
    text = caplog.text
    for token in tokens:
        assert token not in text
