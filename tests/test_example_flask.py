"""examples/flask-embed: a Flask view reading the identity, with real tokens and keys."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims, service_claims

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flask-embed" / "app.py"
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


def test_a_refusal_reason_is_in_the_combined_log_line(
    client: Any, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    response = client.get("/", headers={HEADER: key.sign(claims(email="eve@evil.com"))})
    assert response.status_code == 403
    response.close()  # the line is written when the response is closed
    [line] = [r.getMessage() for r in caplog.records if r.name == "authproxy.access"]
    assert '"GET / HTTP/1.1" 403 ' in line
    assert line.endswith(' refusal="not allowed by policy: eve@evil.com"'), line


def test_a_bad_option_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from authproxy import ConfigError

    monkeypatch.delenv("AUTHPROXY_TEAM_DOMAIN", raising=False)
    with pytest.raises(ConfigError) as caught:
        _load_example().create_app(audience=[AUDIENCE])
    assert caught.value.key == "team_domain"


@pytest.mark.parametrize("unset", ["AUTHPROXY_TEAM_DOMAIN", "AUTHPROXY_AUDIENCE"])
def test_flask_run_without_a_setting_says_which_without_a_traceback(
    unset: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(AUTHPROXY_TEAM_DOMAIN=TEAM_DOMAIN, AUTHPROXY_AUDIENCE=AUDIENCE)
    del env[unset]
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", str(EXAMPLE), "routes"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"flask-embed: set {unset} (see examples/flask-embed/README.md)"
    ), result.stderr
