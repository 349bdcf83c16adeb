"""AccessGroups against a local stand-in for Access's get-identity: caching, bounds, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from authproxy.context import VerifiedIdentity
from authproxy.middleware.identity.groups import AccessGroups, GroupsUnavailable

from .impersonation import AccessIdentity


@pytest.fixture
def access() -> Iterator[AccessIdentity]:
    server = AccessIdentity({"alice@example.com": ["sre", "dev"], "bob@example.com": []})
    yield server
    server.stop()


def token_for(email: str, exp: float | None = None, **extra: Any) -> tuple[str, VerifiedIdentity]:
    """A token the stand-in reads (it does not check signatures) and its verified identity."""
    claims = {"email": email, "exp": int(exp or time.time() + 600), **extra}
    token = jwt.encode(claims, "k" * 32, algorithm="HS256")
    return token, VerifiedIdentity(subject="s", email=email, claims=claims)


def test_groups_are_the_names_in_order_and_kept_per_token(access: AccessIdentity) -> None:
    groups = AccessGroups(access.url)
    token, alice = token_for("alice@example.com")
    enriched = groups.apply(token, alice)
    assert enriched.groups == ("sre", "dev")
    assert enriched.email == alice.email and enriched.claims == alice.claims
    assert access.hits == 1
    token_b, bob = token_for("bob@example.com")
    assert groups.apply(token_b, bob).groups == ()
    assert access.hits == 2
    # Nothing the endpoint set is kept for the next person.
    assert len(groups._session.cookies) == 0
    groups.close()


def test_an_expired_entry_is_asked_again(access: AccessIdentity) -> None:
    groups = AccessGroups(access.url)
    token, alice = token_for("alice@example.com", exp=time.time() - 1)
    groups.apply(token, alice)
    groups.apply(token, alice)
    assert access.hits == 2
    groups.close()


def test_the_cache_is_bounded(access: AccessIdentity) -> None:
    groups = AccessGroups(access.url, cache_size=2)
    tokens = [token_for("alice@example.com", jti=str(i)) for i in range(5)]
    for token, identity in tokens:
        groups.apply(token, identity)
    assert len(groups) == 2
    groups.apply(*tokens[-1])  # still kept
    assert access.hits == 5
    groups.apply(*tokens[0])  # dropped long ago
    assert access.hits == 6
    groups.close()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("error", "HTTP 500"),
        ("garbage", "the answer is not JSON"),
        ("other", "the answer is about another identity"),
    ],
)
def test_failures_raise_and_are_not_remembered(
    access: AccessIdentity, mode: str, reason: str
) -> None:
    groups = AccessGroups(access.url)
    token, alice = token_for("alice@example.com")
    access.set_mode(mode)
    with pytest.raises(GroupsUnavailable) as caught:
        groups.apply(token, alice)
    assert caught.value.reason == reason
    assert token not in caught.value.reason
    access.set_mode("ok")
    assert groups.apply(token, alice).groups == ("sre", "dev")
    groups.close()


def test_a_stalled_endpoint_times_out(access: AccessIdentity) -> None:
    groups = AccessGroups(access.url, timeout=0.5)
    token, alice = token_for("alice@example.com")
    access.set_mode("stall")
    started = time.monotonic()
    with pytest.raises(GroupsUnavailable, match="timed out"):
        groups.apply(token, alice)
    assert time.monotonic() - started < 5
    access.set_mode("ok")
    groups.close()


def test_an_unreachable_endpoint_is_a_failure() -> None:
    groups = AccessGroups("http://127.0.0.1:9/cdn-cgi/access/get-identity", timeout=1)
    token, alice = token_for("alice@example.com")
    with pytest.raises(GroupsUnavailable, match="connection failed"):
        groups.apply(token, alice)
    groups.close()
