"""Header rules: hop-by-hop stripping, Impersonate-*, environ key <-> header name."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authproxy.headers import (
    HOP_BY_HOP_NAMES,
    REQUEST_CHUNKED_KEY,
    SANITIZED_KEY,
    TE_TRAILERS_KEY,
    UPGRADE_KEY,
    connection_tokens,
    environ_key,
    has_ctl,
    header_name,
    sanitize,
)


def base_environ(**headers: str) -> dict[str, Any]:
    env: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}
    env.update(headers)
    return env


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("X-Forwarded-For", "HTTP_X_FORWARDED_FOR"),
        ("authorization", "HTTP_AUTHORIZATION"),
        ("Content-Type", "CONTENT_TYPE"),
        ("content-length", "CONTENT_LENGTH"),
        ("Impersonate-Extra-Scopes", "HTTP_IMPERSONATE_EXTRA_SCOPES"),
        ("TE", "HTTP_TE"),
    ],
)
def test_environ_key(name: str, key: str) -> None:
    assert environ_key(name) == key


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("HTTP_X_FORWARDED_FOR", "X-Forwarded-For"),
        ("HTTP_AUTHORIZATION", "Authorization"),
        ("CONTENT_TYPE", "Content-Type"),
        ("HTTP_X_REQUEST_ID", "X-Request-Id"),
    ],
)
def test_header_name(key: str, name: str) -> None:
    assert header_name(key) == name


@given(st.from_regex(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)*", fullmatch=True))
def test_header_names_round_trip_through_environ_keys(name: str) -> None:
    key = environ_key(name)
    assert header_name(key).lower() == name.lower()
    assert environ_key(header_name(key)) == key


def test_connection_tokens() -> None:
    assert connection_tokens(" Keep-Alive ,Authorization,, x-a ") == [
        "keep-alive",
        "authorization",
        "x-a",
    ]
    assert connection_tokens("") == []


@pytest.mark.parametrize(
    ("value", "bad"),
    [("ok value", False), ("a\rb", True), ("a\nb", True), ("a\0b", True), ("tab\tok", False)],
)
def test_has_ctl(value: str, bad: bool) -> None:
    assert has_ctl(value) is bad


def test_sanitize_strips_the_fixed_hop_by_hop_list() -> None:
    env = base_environ(
        HTTP_CONNECTION="keep-alive",
        HTTP_KEEP_ALIVE="timeout=5",
        HTTP_PROXY_CONNECTION="keep-alive",
        HTTP_PROXY_AUTHENTICATE="Basic",
        HTTP_PROXY_AUTHORIZATION="Basic eA==",
        HTTP_TE="gzip",
        HTTP_TRAILER="X-Sum",
        HTTP_TRANSFER_ENCODING="chunked",
        HTTP_UPGRADE="h2c",
        HTTP_X_END_TO_END="1",
    )
    sanitize(env)
    assert not [k for k in env if k.startswith("HTTP_") and k != "HTTP_X_END_TO_END"]
    assert env["HTTP_X_END_TO_END"] == "1"
    assert {environ_key(n) for n in HOP_BY_HOP_NAMES}.isdisjoint(env)
    assert env[REQUEST_CHUNKED_KEY] is True
    assert TE_TRAILERS_KEY not in env


def test_sanitize_strips_names_listed_in_connection() -> None:
    env = base_environ(
        HTTP_CONNECTION="close, Authorization ,X-Hop, content-length, Content-Type",
        HTTP_AUTHORIZATION="Bearer client",
        HTTP_X_HOP="1",
        HTTP_X_KEEP="1",
        CONTENT_LENGTH="3",
        CONTENT_TYPE="text/plain",
    )
    sanitize(env)
    assert "HTTP_AUTHORIZATION" not in env
    assert "HTTP_X_HOP" not in env
    assert env["HTTP_X_KEEP"] == "1"
    # Framing belongs to the server; Connection cannot remove it.
    assert (env["CONTENT_LENGTH"], env["CONTENT_TYPE"]) == ("3", "text/plain")


def test_sanitize_runs_once_so_later_injection_survives() -> None:
    env = base_environ(HTTP_CONNECTION="Authorization", HTTP_AUTHORIZATION="Bearer client")
    sanitize(env)
    assert env[SANITIZED_KEY] is True
    env["HTTP_AUTHORIZATION"] = "Bearer injected"  # what InjectHeaders does next
    env["HTTP_CONNECTION"] = "Authorization"  # even if something put it back
    sanitize(env)
    assert env["HTTP_AUTHORIZATION"] == "Bearer injected"


@pytest.mark.parametrize(
    ("te", "connection", "trailers"),
    [
        ("trailers", None, True),
        ("gzip, Trailers", None, True),
        ("trailers", "TE", True),  # Go looks before removing what Connection lists
        ("gzip", None, False),
        ("trailersx", None, False),
    ],
)
def test_sanitize_remembers_te_trailers(te: str, connection: str | None, trailers: bool) -> None:
    env = base_environ(HTTP_TE=te)
    if connection is not None:
        env["HTTP_CONNECTION"] = connection
    sanitize(env)
    assert "HTTP_TE" not in env
    assert env.get(TE_TRAILERS_KEY, False) is trailers


def test_sanitize_remembers_an_upgrade_request() -> None:
    env = base_environ(HTTP_CONNECTION="keep-alive, Upgrade", HTTP_UPGRADE="websocket")
    sanitize(env)
    assert env[UPGRADE_KEY] == "websocket"
    assert "HTTP_UPGRADE" not in env
    plain = base_environ(HTTP_UPGRADE="websocket")  # not announced in Connection
    sanitize(plain)
    assert UPGRADE_KEY not in plain


def test_sanitize_strips_impersonation_unless_told_not_to() -> None:
    headers = {
        "HTTP_IMPERSONATE_USER": "admin",
        "HTTP_IMPERSONATE_GROUP": "system:masters",
        "HTTP_IMPERSONATE_UID": "0",
        "HTTP_IMPERSONATE_EXTRA_SCOPES": "x",
        "HTTP_X_IMPERSONATE_USER": "not a prefix match",
    }
    env = base_environ(**headers)
    sanitize(env)
    assert [k for k in env if "IMPERSONATE" in k] == ["HTTP_X_IMPERSONATE_USER"]
    kept = base_environ(**headers)
    sanitize(kept, strip_impersonation=False)
    assert all(kept[k] == v for k, v in headers.items())


def test_sanitize_leaves_non_header_keys_alone() -> None:
    env = base_environ(HTTP_CONNECTION="PATH_INFO, wsgi.url_scheme")
    sanitize(env)
    assert env["PATH_INFO"] == "/" and env["wsgi.url_scheme"] == "http"
