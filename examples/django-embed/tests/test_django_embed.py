"""examples/django-embed: a Django view reading the identity, with real keys and tokens."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

EXAMPLE = Path(__file__).resolve().parent.parent
HEADER = "Cf-Access-Jwt-Assertion"


@pytest.fixture(scope="module")
def example() -> Iterator[tuple[Any, Any]]:
    sys.path.insert(0, str(EXAMPLE))
    from django_embed.local_access import AUDIENCE, TEAM_DOMAIN, LocalAccess

    access = LocalAccess().start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_SETTINGS_MODULE", "django_embed.settings")
        mp.setenv("AUTHPROXY_TEAM_DOMAIN", TEAM_DOMAIN)
        mp.setenv("AUTHPROXY_AUDIENCE", AUDIENCE)
        mp.setenv("AUTHPROXY_CERTS_URL", access.certs_url)
        from django_embed.wsgi import application

        yield Client(application), access
    access.stop()
    sys.path.remove(str(EXAMPLE))


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "authproxy.access"]


def test_view_reads_the_verified_identity(
    example: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    client, access = example
    token = access.token("alice@example.com")
    response = client.get("/", headers={HEADER: token}, buffered=True)
    assert response.status_code == 200
    assert response.get_json() == {
        "email": "alice@example.com",
        "service_token": None,
        "name": "alice@example.com",
    }
    (line,) = access_lines(caplog)
    assert (line["identity"], line["status"]) == ("alice@example.com", 200)
    assert token not in caplog.text


def test_without_a_valid_token_the_view_is_never_reached(
    example: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    client, access = example
    missing = client.get("/", buffered=True)
    wrong_audience = client.get("/", headers={HEADER: access.token(aud=["other"])}, buffered=True)
    expired = client.get("/", headers={HEADER: access.token(exp=1)}, buffered=True)
    assert [r.status_code for r in (missing, wrong_audience, expired)] == [401, 403, 403]
    assert all(b"email" not in r.data for r in (missing, wrong_audience, expired))
    assert [line["status"] for line in access_lines(caplog)] == [401, 403, 403]
    assert all(line["refusal"] for line in access_lines(caplog))


def test_runs_with_one_command() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHPROXY", "DJANGO"))}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "run.py"), "--self-test"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert '200 {"email": "you@example.com"' in result.stdout
    assert "401 without a token" in result.stdout
    logging.getLogger(__name__).debug("example output: %s", result.stdout)
