"""The example plugin: on its own around a tiny app, and found by name once installed."""

from __future__ import annotations

from typing import Any

import pytest
from authproxy_readonly import ReadOnly
from werkzeug.test import Client

from authproxy import ConfigError, VerifiedIdentity, build_app
from authproxy.plugins import find, load


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def as_user(name: str) -> dict[str, Any]:
    return {"authproxy.identity": VerifiedIdentity(subject=name, email=name)}


client = Client(ReadOnly(hello, writers=["alice@example.com"]))


def test_reading_is_for_everyone() -> None:
    assert client.get("/").status_code == 200
    assert client.get("/", environ_overrides=as_user("bob@example.com")).status_code == 200


def test_writing_is_for_writers() -> None:
    assert client.post("/", environ_overrides=as_user("alice@example.com")).status_code == 200
    refused = client.post("/", environ_overrides=as_user("bob@example.com"))
    assert refused.status_code == 403
    assert client.delete("/").status_code == 403  # no identity at all


def test_the_reason_goes_to_the_log_not_the_client() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            return ReadOnly(hello)(environ, start_response)
        finally:
            seen.update(environ)

    response = Client(app).post("/")
    assert response.data == b"Forbidden\n"
    assert seen["authproxy.refusal"] == "read-only: not a writer"


def test_installed_under_its_name() -> None:
    plugin = find("read-only", "use")
    assert plugin.distribution.startswith("authproxy-readonly ")
    assert load("read-only") is ReadOnly


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"\(read-only\)\.writers: expected list\[str\]"):
        build_app(
            {
                "upstream": {"url": "http://127.0.0.1:9"},
                "pipeline": [{"use": "read-only", "writers": "alice@example.com"}],
            }
        )
