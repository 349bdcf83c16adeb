"""The impersonate step around a tiny WSGI app, its options, and the identity step's
``groups``/``identity_url``/``allow_groups`` options as config."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.test import Client

from authproxy import ConfigError, Impersonate, VerifiedIdentity, build_app
from authproxy.context import EXTRA_HEADERS, IDENTITY, add_upstream_header
from authproxy.middleware.identity import Identity
from authproxy.middleware.identity.policy import Policy
from authproxy.middleware.impersonate import extra_header

from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey


class Recorder:
    def __init__(self) -> None:
        self.environ: dict[str, Any] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.environ = dict(environ)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    @property
    def lines(self) -> list[tuple[str, str]]:
        return list(self.environ.get(EXTRA_HEADERS, []))


def run(step: Impersonate, identity: VerifiedIdentity | None, **headers: str) -> int:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if identity is not None:
            environ[IDENTITY] = identity
        return step(environ, start_response)

    return Client(app).get("/", headers=headers).status_code


ALICE = VerifiedIdentity(
    subject="u-1",
    email="alice@example.com",
    groups=("sre", "dev"),
    claims={"scope": ["openid", "email"], "tenant": "acme"},
)


def test_defaults_name_the_person_and_each_group() -> None:
    inner = Recorder()
    assert run(Impersonate(inner), ALICE) == 200
    assert inner.lines == [
        ("Impersonate-User", "alice@example.com"),
        ("Impersonate-Group", "sre"),
        ("Impersonate-Group", "dev"),
    ]


def test_a_list_expands_inside_a_template_and_literals_stay_one_line() -> None:
    inner = Recorder()
    step = Impersonate(
        inner,
        groups=["oidc:${identity:groups}", "dashboard-users", "${identity:nothing}"],
        extra={"scopes": "${identity:scope}", "tenant": "${identity:tenant}"},
        uid="${identity:subject}",
    )
    assert run(step, ALICE) == 200
    assert inner.lines == [
        ("Impersonate-User", "alice@example.com"),
        ("Impersonate-Group", "oidc:sre"),
        ("Impersonate-Group", "oidc:dev"),
        ("Impersonate-Group", "dashboard-users"),
        ("Impersonate-Uid", "u-1"),
        ("Impersonate-Extra-scopes", "openid"),
        ("Impersonate-Extra-scopes", "email"),
        ("Impersonate-Extra-tenant", "acme"),
    ]


def test_no_groups_option_sends_none() -> None:
    inner = Recorder()
    assert run(Impersonate(inner, groups=[]), ALICE) == 200
    assert inner.lines == [("Impersonate-User", "alice@example.com")]


def test_a_service_token_is_named_by_default_and_a_nameless_identity_refused() -> None:
    inner = Recorder()
    bot = VerifiedIdentity(subject="", service_token="ci-bot.access")
    assert run(Impersonate(inner), bot) == 200
    assert inner.lines == [("Impersonate-User", "ci-bot.access")]
    # Only a sub: the default user template has nothing to say, and sending no
    # Impersonate-User would act with the service account's rights.
    inner = Recorder()
    assert run(Impersonate(inner), VerifiedIdentity(subject="s-1")) == 403
    assert inner.environ == {}
    assert run(Impersonate(inner, user="${identity:name}"), VerifiedIdentity(subject="s-1")) == 200
    assert inner.lines == [("Impersonate-User", "s-1")]


def test_a_non_ascii_name_goes_as_utf8() -> None:
    inner = Recorder()
    who = VerifiedIdentity(subject="s", email="zoë@example.com", groups=("équipe",))
    assert run(Impersonate(inner), who) == 200
    assert inner.lines == [
        ("Impersonate-User", "zoë@example.com".encode().decode("latin-1")),
        ("Impersonate-Group", "équipe".encode().decode("latin-1")),
    ]


@pytest.mark.parametrize("bad", ["a\r\nb", "a\nb", "a\0b"])
def test_a_control_character_in_any_value_refuses(bad: str) -> None:
    inner = Recorder()
    for who in (
        VerifiedIdentity(subject="s", email=f"x{bad}@example.com"),
        VerifiedIdentity(subject="s", email="x@example.com", groups=("ok", bad)),
        VerifiedIdentity(subject="s", email="x@example.com", claims={"scope": bad}),
    ):
        step = Impersonate(inner, extra={"scopes": "${identity:scope}"})
        assert run(step, who) == 403
        assert inner.environ == {}


def test_without_identity_refused_unless_not_required() -> None:
    inner = Recorder()
    assert run(Impersonate(inner), None) == 403
    assert run(Impersonate(inner, require_identity=False), None, **{"Impersonate-User": "x"}) == 200
    assert inner.lines == []
    assert not [k for k in inner.environ if k.startswith("HTTP_IMPERSONATE")]


def test_impersonate_headers_already_in_the_environ_are_replaced() -> None:
    inner = Recorder()
    assert run(Impersonate(inner), ALICE, **{"Impersonate-Group": "system:masters"}) == 200
    assert "HTTP_IMPERSONATE_GROUP" not in inner.environ
    assert ("Impersonate-Group", "system:masters") not in inner.lines


@pytest.mark.parametrize(
    ("key", "header"),
    [
        ("scopes", "Impersonate-Extra-scopes"),
        ("acme.com/project", "Impersonate-Extra-acme.com%2Fproject"),
        ("100%", "Impersonate-Extra-100%25"),
        ("with space", "Impersonate-Extra-with%20space"),
        ("équipe", "Impersonate-Extra-%C3%A9quipe"),
    ],
)
def test_extra_keys_are_percent_encoded_as_kubernetes_reads_them(key: str, header: str) -> None:
    assert extra_header(key, "extra") == header


@pytest.mark.parametrize("key", ["", "Scopes", "a\nb", "tab\there"])
def test_a_bad_extra_key_is_a_config_error_naming_it(key: str, jwks: JwksServer) -> None:
    config = pipeline_config(jwks, {"use": "impersonate", "extra": {key: "${identity:scope}"}})
    with pytest.raises(ConfigError) as caught:
        build_app(config)
    assert caught.value.key == f"pipeline[1] (impersonate).extra.{key}"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"user": ""}, "user"),
        ({"groups": "${identity:groups}"}, "groups"),
        ({"groups": ["${nope:x}"]}, "groups[0]"),
        ({"uid": "${env:AUTHPROXY_TEST_SURELY_UNSET}"}, "uid"),
        ({"extra": {"a": "${identity:a}", "A": "x"}}, "extra.A"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Impersonate(Recorder(), **options)
    assert caught.value.key == key


def test_the_step_is_exported_and_declares_its_predecessor() -> None:
    assert Impersonate.authproxy_after == ("identity",)


def test_add_upstream_header_refuses_what_could_split_the_head() -> None:
    environ: dict[str, Any] = {}
    add_upstream_header(environ, "Impersonate-Group", "a")
    add_upstream_header(environ, "Impersonate-Group", "b")
    assert environ[EXTRA_HEADERS] == [("Impersonate-Group", "a"), ("Impersonate-Group", "b")]
    for name, value in (("X", "a\r\nb"), ("X: y", "a"), ("", "a"), ("X\n", "a")):
        with pytest.raises(ValueError):
            add_upstream_header(environ, name, value)


# -- the identity step's groups options -------------------------------------------------


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer([SigningKey("RSA")]) as server:
        yield server


def pipeline_config(jwks: JwksServer, *steps: dict[str, Any], **identity: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": "http://127.0.0.1:9"},
        "pipeline": [
            {
                "use": "identity",
                "team_domain": TEAM_DOMAIN,
                "audience": [AUDIENCE],
                "certs_url": jwks.url,
                **identity,
            },
            *steps,
        ],
    }


@pytest.mark.parametrize(
    ("options", "key", "problem"),
    [
        ({"groups": "access", "provider": "oidc", "issuer": "x", "header": "X"}, "groups", "needs"),
        ({"groups": "ldap"}, "groups", "expected"),
        ({"groups": "claim:"}, "groups", "claim name"),
        ({"groups": ["sre"]}, "groups", "expected"),
        ({"identity_url": "https://x.example/get-identity"}, "identity_url", "only used"),
        (
            {"groups": "access", "identity_url": "http://access.example/get-identity"},
            "identity_url",
            "https://",
        ),
        ({"allow_groups": ["sre"]}, "allow_groups", 'groups = "access"'),
        ({"allow_groups": "sre", "groups": "access"}, "allow_groups", "list"),
        ({"groups": "access", "groups_timeout": 0}, "groups_timeout", "> 0"),
    ],
)
def test_identity_group_options_are_checked(
    jwks: JwksServer, options: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_app(pipeline_config(jwks, **options))
    assert caught.value.key == f"pipeline[0] (identity).{key}"
    assert problem in caught.value.problem


def test_identity_url_is_derived_from_the_team_domain_or_given(jwks: JwksServer) -> None:
    derived = Identity(
        Recorder(), team_domain=TEAM_DOMAIN, audience=AUDIENCE, certs_url=jwks.url, groups="access"
    )
    given = Identity(
        Recorder(),
        team_domain=TEAM_DOMAIN,
        audience=AUDIENCE,
        certs_url=jwks.url,
        groups="access",
        identity_url="http://127.0.0.1:1/cdn-cgi/access/get-identity",
    )
    try:
        assert derived.access_groups is not None and given.access_groups is not None
        assert derived.access_groups.url == f"https://{TEAM_DOMAIN}/cdn-cgi/access/get-identity"
        assert given.access_groups.url == "http://127.0.0.1:1/cdn-cgi/access/get-identity"
        assert derived.describe()["groups"].startswith(f"from https://{TEAM_DOMAIN}/")
    finally:
        derived.close()
        given.close()


def test_allow_groups_combines_with_the_other_lists_by_or() -> None:
    policy = Policy(
        emails=["bob@example.com"],
        domains=None,
        service_tokens=["ci-bot"],
        claims=None,
        groups=["sre", "platform"],
    )
    assert policy.allows(VerifiedIdentity(subject="s", email="bob@example.com"))
    assert policy.allows(VerifiedIdentity(subject="s", email="al@x.org", groups=("dev", "sre")))
    assert policy.allows(VerifiedIdentity(subject="", service_token="ci-bot"))
    assert not policy.allows(VerifiedIdentity(subject="s", email="al@x.org", groups=("dev",)))
    # Exact and case-sensitive, as RBAC compares group names.
    assert not policy.allows(VerifiedIdentity(subject="s", email="al@x.org", groups=("SRE",)))
    assert policy.describe()["groups"] == ["platform", "sre"]  # type: ignore[index]
