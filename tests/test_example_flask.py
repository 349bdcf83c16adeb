"""examples/flask-embed: a Flask view reading the identity, with real tokens and keys."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims, service_claims

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask-embed" / "app.py"
HEADER = "Cf-Access-Jwt-Assertion"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_embed_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("RSA")


@pytest.fixture
def client(key: SigningKey) -> Iterator[Any]:
    with JwksServer([key]) as jwks:
        app = _load_example().create_app(
            team_domain=TEAM_DOMAIN,
            audience=[AUDIENCE],
            certs_url=jwks.url,
            allow_email_domains=["example.com"],
            allow_service_tokens=["ci-bot.access"],
        )
        yield app.test_client()
        app.extensions["authproxy.identity"].close()


def test_the_view_reads_the_verified_identity(client: Any, key: SigningKey) -> None:
    response = client.get("/", headers={HEADER: key.sign(claims(groups=["sre"]))})
    assert response.status_code == 200
    assert response.get_json() == {
        "email": "alice@example.com",
        "service_token": None,
        "name": "alice@example.com",
        "groups": ["sre"],
    }


def test_a_service_token_is_an_identity_too(client: Any, key: SigningKey) -> None:
    response = client.get("/", headers={HEADER: key.sign(service_claims("ci-bot.access"))})
    assert response.status_code == 200
    assert response.get_json()["name"] == "ci-bot.access"


def test_no_token_never_reaches_the_view(client: Any) -> None:
    response = client.get("/")
    assert response.status_code == 401


@pytest.mark.parametrize(
    "token_claims", [claims(email="eve@evil.com"), claims(aud=["another-app"])]
)
def test_refused_tokens_never_reach_the_view(
    client: Any, key: SigningKey, token_claims: dict[str, Any]
) -> None:
    response = client.get("/", headers={HEADER: key.sign(token_claims)})
    assert response.status_code == 403
    assert b"email" not in response.data


def test_health_needs_no_token(client: Any) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.data) == (200, b"ok")


def test_missing_settings_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from authproxy import ConfigError

    monkeypatch.delenv("AUTHPROXY_TEAM_DOMAIN", raising=False)
    monkeypatch.setenv("AUTHPROXY_AUDIENCE", AUDIENCE)
    with pytest.raises(ConfigError) as caught:
        _load_example().create_app()
    assert caught.value.key == "team_domain"
