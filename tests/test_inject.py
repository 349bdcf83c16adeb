"""InjectHeaders and its value templates, around a recording WSGI app."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from authproxy import InjectHeaders
from authproxy.context import IDENTITY, VerifiedIdentity
from authproxy.errors import ConfigError
from authproxy.middleware.templates import Template
from authproxy.secrets import redact

from .support import TOKEN


class Recorder:
    """An inner app that keeps the environ it was called with."""

    def __init__(self, headers: list[tuple[str, str]] | None = None) -> None:
        self.environ: dict[str, Any] = {}
        self.headers = headers or [("Content-Type", "text/plain"), ("Server", "upstream/1.0")]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.environ = dict(environ)
        start_response("200 OK", list(self.headers))
        return [b"ok"]


def with_identity(app: Any, **fields: Any) -> Any:
    identity = VerifiedIdentity(subject="sub-1", **fields)

    def wrapper(environ: dict[str, Any], start_response: Any) -> Any:
        environ[IDENTITY] = identity
        return app(environ, start_response)

    return wrapper


def test_set_replaces_what_the_client_sent() -> None:
    inner = Recorder()
    app = InjectHeaders(inner, set={"Authorization": f"Bearer {TOKEN}"})
    response = Client(app).get("/", headers={"Authorization": "Bearer forged"})
    assert response.status_code == 200
    assert inner.environ["HTTP_AUTHORIZATION"] == f"Bearer {TOKEN}"


def test_connection_header_cannot_delete_the_injected_token() -> None:
    inner = Recorder()
    app = InjectHeaders(inner, set={"Authorization": f"Bearer {TOKEN}"})
    Client(app).get("/", headers={"Connection": "Authorization, X-Other", "X-Other": "1"})
    assert inner.environ["HTTP_AUTHORIZATION"] == f"Bearer {TOKEN}"
    assert "HTTP_X_OTHER" not in inner.environ


def test_add_appends_and_remove_drops_names_and_prefixes() -> None:
    inner = Recorder()
    app = InjectHeaders(
        inner,
        add={"X-Tag": "proxy"},
        remove=["X-Drop", "X-Internal-*"],
    )
    Client(app).get(
        "/",
        headers={
            "X-Tag": "client",
            "X-Drop": "1",
            "X-Internal-A": "2",
            "X-Internal-B": "3",
            "X-Keep": "4",
        },
    )
    env = inner.environ
    assert env["HTTP_X_TAG"] == "client, proxy"
    assert "HTTP_X_DROP" not in env
    assert not [k for k in env if k.startswith("HTTP_X_INTERNAL_")]
    assert env["HTTP_X_KEEP"] == "4"


def test_response_section_sets_and_removes() -> None:
    inner = Recorder([("Server", "upstream/1.0"), ("X-Powered-By", "php"), ("X-Up", "1")])
    app = InjectHeaders(
        inner,
        response={
            "set": {"Strict-Transport-Security": "max-age=63072000"},
            "remove": ["Server", "X-Powered-*"],
        },
    )
    response = Client(app).get("/")
    assert response.headers["Strict-Transport-Security"] == "max-age=63072000"
    assert "Server" not in response.headers
    assert "X-Powered-By" not in response.headers
    assert response.headers["X-Up"] == "1"


def test_env_source_is_read_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AP_TEST_TOKEN", "from-env-123456")
    inner = Recorder()
    app = InjectHeaders(inner, set={"Authorization": "Bearer ${env:AP_TEST_TOKEN}"})
    monkeypatch.setenv("AP_TEST_TOKEN", "changed-later")
    Client(app).get("/")
    assert inner.environ["HTTP_AUTHORIZATION"] == "Bearer from-env-123456"


def test_missing_env_var_is_a_config_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AP_NOT_SET", raising=False)
    with pytest.raises(ConfigError) as info:
        InjectHeaders(Recorder(), set={"Authorization": "Bearer ${env:AP_NOT_SET}"})
    assert info.value.key == "set.Authorization"
    assert "AP_NOT_SET" in str(info.value)


def test_missing_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        InjectHeaders(Recorder(), set={"Authorization": f"Bearer ${{file:{tmp_path}/nope}}"})
    assert info.value.key == "set.Authorization"
    assert "nope" in str(info.value)


@pytest.mark.parametrize(
    "template, problem",
    [
        ("Bearer ${vault:x}", "unknown source"),
        ("Bearer ${env:UNFINISHED", "unfinished"),
        ("a\r\nX-Evil: 1", "CR, LF or NUL"),
        ("${identity:}", "claim name"),
    ],
)
def test_bad_templates_are_refused_at_startup(template: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        InjectHeaders(Recorder(), set={"X-Value": template})
    assert problem in str(info.value)


def test_bad_header_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="header name"):
        InjectHeaders(Recorder(), set={"X Bad": "1"})


def test_dollar_escape_is_literal() -> None:
    assert Template("cost: $$5", key="k").constant == "cost: $5"


class TokenFile:
    """A token file and InjectHeaders sending it as a bearer token, with a recording app."""

    def __init__(self, tmp_path: Path, value: str, check_interval: float) -> None:
        self.path = tmp_path / "token"
        self.path.write_text(value)
        self.inner = Recorder()
        app = InjectHeaders(
            self.inner,
            set={"Authorization": f"Bearer ${{file:{self.path}}}"},
            file_check_interval=check_interval,
        )
        self.client = Client(app)

    def sent(self) -> str:
        """The Authorization header of one request, as the inner app got it."""
        self.client.get("/")
        return str(self.inner.environ["HTTP_AUTHORIZATION"])

    def rotate(self, value: str) -> None:
        """Swap the file as Kubernetes does: a new inode via a rename."""
        fresh = self.path.with_name("token.new")
        fresh.write_text(value)
        os.replace(fresh, self.path)


def test_file_source_follows_rotation(tmp_path: Path) -> None:
    token = TokenFile(tmp_path, "first-token-value\n", check_interval=0)  # looked at every time
    assert token.sent() == "Bearer first-token-value"
    token.rotate("second-token-value")
    assert token.sent() == "Bearer second-token-value"


def test_file_is_looked_at_once_per_check_interval(tmp_path: Path) -> None:
    token = TokenFile(tmp_path, "first-token-value\n", check_interval=3600)
    token.rotate("second-token-value")
    assert token.sent() == "Bearer first-token-value"


def test_vanished_file_keeps_last_value_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = TokenFile(tmp_path, "kept-token-value", check_interval=0)
    token.path.unlink()
    for _ in range(3):
        assert token.sent() == "Bearer kept-token-value"
    warnings = [r for r in caplog.records if "keeping the last good value" in r.getMessage()]
    assert len(warnings) == 1
    assert "kept-token-value" not in warnings[0].getMessage()


def test_identity_claims_fill_templates() -> None:
    inner = Recorder()
    app = with_identity(
        InjectHeaders(
            inner,
            set={"X-User": "${identity:email}", "X-Groups": "${identity:groups}"},
        ),
        email="ana@example.com",
        # ${identity:groups} is the identity's groups field (the identity step
        # fills it from its groups source), which wins over a claim of that name.
        groups=("ops", "dev"),
        claims={"groups": ["not", "these"]},
    )
    Client(app).get("/")
    assert inner.environ["HTTP_X_USER"] == "ana@example.com"
    assert inner.environ["HTTP_X_GROUPS"] == "ops,dev"


def test_missing_claim_sends_no_header_and_drops_the_clients_copy() -> None:
    inner = Recorder()
    app = with_identity(InjectHeaders(inner, set={"X-User": "${identity:email}"}), email=None)
    Client(app).get("/", headers={"X-User": "forged@example.com"})
    assert "HTTP_X_USER" not in inner.environ


def test_claim_with_crlf_is_refused_with_500(caplog: pytest.LogCaptureFixture) -> None:
    inner = Recorder()
    app = with_identity(
        InjectHeaders(inner, set={"X-User": "${identity:email}"}),
        email="evil@example.com\r\nX-Injected: 1",
    )
    response = Client(app).get("/")
    assert response.status_code == 500
    assert inner.environ == {}, "the request must not reach the next step"
    assert b"evil" not in response.data
    assert any("X-User" in r.getMessage() for r in caplog.records)


def test_injected_values_are_registered_as_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AP_SECRET_VALUE", "env-secret-98765")
    InjectHeaders(
        Recorder(),
        set={"Authorization": "Bearer literal-secret-4242", "X-Key": "${env:AP_SECRET_VALUE}"},
    )
    line = "sent literal-secret-4242 and env-secret-98765"
    assert redact(line) == "sent *** and ***"


def test_describe_redacts_every_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("file-secret-31337")
    app = InjectHeaders(
        Recorder(),
        set={"Authorization": f"Bearer ${{file:{token}}}", "X-Lit": "literal-value-1"},
        remove=["X-Internal-*"],
    )
    shown = repr(app.describe())
    assert "file-secret-31337" not in shown and "literal-value-1" not in shown
    assert "from literal, file" in shown
    assert "x-internal-*" in shown


def test_logging_redacts_secrets_through_the_formatter() -> None:
    from authproxy.secrets import RedactingFormatter, register_secret

    register_secret("formatter-secret-1")
    record = logging.LogRecord(
        "t", logging.INFO, __file__, 1, "x %s", ("formatter-secret-1",), None
    )
    assert RedactingFormatter("%(message)s").format(record) == "x ***"
