"""Loading the configuration: sources, defaults, and errors that name the key."""

from __future__ import annotations

import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest

from authproxy._types import conforms, describe
from authproxy.config import (
    Config,
    _dual_stack,
    from_environment,
    from_mapping,
    listen_from_go,
    load_config,
    load_file,
)
from authproxy.errors import ConfigError
from authproxy.serve.gunicorn import gunicorn_settings

from .support import TOKEN

UP = {"url": "http://127.0.0.1:9"}


def test_defaults_match_the_design() -> None:
    config = from_mapping({"upstream": UP})
    assert config.server.listen == "0.0.0.0:8000"
    assert (config.server.workers, config.server.threads) == (2, 16)
    assert config.server.worker_class == "authproxy"
    assert (config.server.header_timeout, config.server.body_timeout) == (10.0, 60.0)
    assert config.upstream.upgrades == ("websocket",)
    assert config.upstream.websocket_max_lifetime == 12 * 3600.0
    up = config.upstream
    assert (up.tls_verify, up.connect_timeout, up.read_timeout) == (True, 5.0, 60.0)
    assert (up.preserve_host, up.strip_impersonation) == (False, True)
    assert (config.health.live, config.health.ready) == ("/healthz", "/readyz")
    assert config.pipeline == ()


def test_full_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "authproxy.toml"
    path.write_text(
        """
[server]
listen = "127.0.0.1:9000"
workers = 3
threads = 4

[upstream]
url = "https://dashboard.internal/base/"
tls_verify = false
connect_timeout = 2
read_timeout = 30.5
preserve_host = true

[health]
live = "/live"
ready = "/ready"

[[pipeline]]
use = "access-log"
format = "combined"

[[pipeline]]
use = "inject-headers"
set = { Authorization = "Bearer x" }
"""
    )
    config = load_file(str(path))
    assert config.source == str(path)
    assert (config.server.listen, config.server.workers, config.server.threads) == (
        "127.0.0.1:9000",
        3,
        4,
    )
    assert config.upstream.url == "https://dashboard.internal/base/"
    assert config.upstream.tls_verify is False
    assert config.upstream.connect_timeout == 2
    assert config.upstream.preserve_host is True
    assert (config.health.live, config.health.ready) == ("/live", "/ready")
    assert [(s.use, dict(s.options)) for s in config.pipeline] == [
        ("access-log", {"format": "combined"}),
        ("inject-headers", {"set": {"Authorization": "Bearer x"}}),
    ]
    assert config.pipeline[1].where == "pipeline[1] (inject-headers)"


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({}, "upstream.url", "required"),
        ({"upstream": {}}, "upstream.url", "required"),
        ({"upstream": {"url": ""}}, "upstream.url", "required"),
        ({"upstream": {"url": "ftp://host/"}}, "upstream.url", "http://"),
        ({"upstream": {"url": "dashboard.svc:443"}}, "upstream.url", "http://"),
        ({"upstream": {"url": "https://"}}, "upstream.url", "host"),
        ({"upstream": {"url": 8080}}, "upstream.url", "expected str"),
        ({"upstream": "http://x"}, "upstream", "table"),
        ({"upstream": {**UP, "tls_verify": 1}}, "upstream.tls_verify", "bool | str"),
        ({"upstream": {**UP, "tls_verify": "/no/such/ca.pem"}}, "upstream.tls_verify", "not found"),
        ({"upstream": {**UP, "client_cert": "/no/cert.pem"}}, "upstream.client_cert", "not found"),
        ({"upstream": {**UP, "read_timeout": "60"}}, "upstream.read_timeout", "float"),
        ({"upstream": {**UP, "preserve_host": "yes"}}, "upstream.preserve_host", "bool"),
        ({"upstream": {**UP, "colour": "red"}}, "upstream.colour", "unknown key"),
        ({"upstream": UP, "server": {"workers": "two"}}, "server.workers", "int"),
        ({"upstream": UP, "server": {"workers": True}}, "server.workers", "int"),
        ({"upstream": UP, "server": {"threads": 0}}, "server.threads", "at least 1"),
        ({"upstream": UP, "server": {"listen": "8000"}}, "server.listen", "HOST:PORT"),
        ({"upstream": UP, "server": {"listen": "x:99999"}}, "server.listen", "HOST:PORT"),
        ({"upstream": UP, "server": {"worker_class": "async"}}, "server.worker_class", "gthread"),
        ({"upstream": UP, "server": {"log_level": "loud"}}, "server.log_level", "info"),
        ({"upstream": UP, "server": {"timeout": 0}}, "server.timeout", "positive"),
        (
            {"upstream": UP, "server": {"graceful_timeout": -1}},
            "server.graceful_timeout",
            "positive",
        ),
        ({"upstream": UP, "server": {"keepalive": -1}}, "server.keepalive", "0 or more"),
        ({"upstream": UP, "health": {"live": "healthz"}}, "health.live", "'/'"),
        ({"upstream": UP, "health": {"ready": 1}}, "health.ready", "str"),
        ({"upstream": UP, "extra": {}}, "extra", "unknown section"),
        ({"upstream": UP, "pipeline": {"use": "x"}}, "pipeline", "array of tables"),
        ({"upstream": UP, "pipeline": ["access-log"]}, "pipeline[0]", "table"),
        ({"upstream": UP, "pipeline": [{"format": "json"}]}, "pipeline[0].use", "required"),
        ({"upstream": UP, "pipeline": [{}, {"use": 3}]}, "pipeline[0].use", "required"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(data)
    assert err.value.key == key
    assert words in err.value.problem
    assert str(err.value).startswith(f"{key}: ")


def test_client_key_needs_a_certificate(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("not checked here")
    with pytest.raises(ConfigError) as err:
        from_mapping({"upstream": {**UP, "client_key": str(key)}})
    assert err.value.key == "upstream.client_key"


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[upstream]\nurl = "http://x"\nread_timeout = = 3\n')
    with pytest.raises(ConfigError) as err:
        load_file(str(path))
    assert err.value.key == str(path)
    assert "line 3" in err.value.problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_file(str(tmp_path / "nope.toml"))
    assert "not found" in str(err.value)


# -- where the configuration comes from ------------------------------------------------


def write(path: Path, url: str) -> Path:
    path.write_text(f'[upstream]\nurl = "{url}"\n')
    return path


def test_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    flag = write(tmp_path / "flag.toml", "http://flag")
    env_file = write(tmp_path / "env.toml", "http://env-file")
    go_env = {"DASHBOARD_PROXY_URL": "http://go-env", "DASHBOARD_TOKEN": TOKEN}
    assert load_config(None, go_env).upstream.url == "http://go-env"
    write(tmp_path / "authproxy.toml", "http://cwd")
    assert load_config(None, {}).upstream.url == "http://cwd"
    env = {**go_env, "AUTHPROXY_CONFIG": str(env_file)}
    assert load_config(None, env).upstream.url == "http://env-file"
    assert load_config(str(flag), env).upstream.url == "http://flag"


def test_a_found_file_beside_the_go_variables_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stray ./authproxy.toml must not silently replace a drop-in's upstream and token."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "authproxy.toml", "http://cwd")
    with pytest.raises(ConfigError) as err:
        load_config(None, {"DASHBOARD_PROXY_URL": "http://go-env", "DASHBOARD_TOKEN": TOKEN})
    assert err.value.key == "authproxy.toml"
    assert "DASHBOARD_PROXY_URL" in err.value.problem and "--config" in err.value.problem
    assert TOKEN not in str(err.value)


def test_a_named_file_wins_over_the_go_variables_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    named = write(tmp_path / "named.toml", "http://named")
    env = {"DASHBOARD_PROXY_URL": "http://go-env", "DASHBOARD_TOKEN": TOKEN}
    by_flag = load_config(str(named), env)
    by_env = load_config(None, {**env, "AUTHPROXY_CONFIG": str(named)})
    assert by_flag.upstream.url == by_env.upstream.url == "http://named"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    for record in warnings:
        assert str(named) in record.getMessage() and "DASHBOARD_PROXY_URL" in record.getMessage()


def test_the_loaded_source_is_logged_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"DASHBOARD_PROXY_URL": "http://go-env", "DASHBOARD_TOKEN": TOKEN}
    load_config(None, env)
    write(tmp_path / "authproxy.toml", "http://cwd")
    load_config(None, {})
    records = [r for r in caplog.records if r.name == "authproxy.config"]
    assert [r.getMessage() for r in records] == [
        "configuration: environment (DASHBOARD_PROXY_URL, DASHBOARD_TOKEN)",
        f"configuration: {tmp_path / 'authproxy.toml'}",
    ]
    assert all(r.levelname == "INFO" for r in records)


def test_no_configuration_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(None, {})
    assert err.value.key == "upstream.url"
    assert "DASHBOARD_PROXY_URL" in err.value.problem
    with pytest.raises(ConfigError) as err:
        load_config(None, {"DASHBOARD_TOKEN": TOKEN})
    assert err.value.key == "DASHBOARD_PROXY_URL"
    assert "DASHBOARD_TOKEN alone" in err.value.problem and TOKEN not in str(err.value)


def test_go_sidecar_variables() -> None:
    config = from_environment(
        {
            "DASHBOARD_PROXY_URL": "https://dash.svc",
            "LISTEN_ADDRESS": ":8080",
            "DASHBOARD_TOKEN": TOKEN,
        }
    )
    assert config.upstream.url == "https://dash.svc"
    assert config.upstream.tls_verify is True
    assert config.server.listen == listen_from_go(":8080")
    assert [(s.use, dict(s.options)) for s in config.pipeline] == [
        ("access-log", {"format": "json"}),
        ("inject-headers", {"set": {"Authorization": f"Bearer {TOKEN}"}}),
    ]


def test_go_sidecar_token_is_a_literal_not_a_template() -> None:
    env = {"DASHBOARD_PROXY_URL": "http://x", "DASHBOARD_TOKEN": "a${env:HOME}$"}
    config = from_environment(env)
    assert config.pipeline[1].options == {"set": {"Authorization": "Bearer a$${env:HOME}$$"}}


def test_go_sidecar_without_listen_address() -> None:
    config = from_environment({"DASHBOARD_PROXY_URL": "http://x", "DASHBOARD_TOKEN": TOKEN})
    assert config.server.listen == "0.0.0.0:8000"


@pytest.mark.parametrize("token", [None, ""], ids=["missing", "empty"])
def test_go_sidecar_requires_the_token(token: str | None) -> None:
    """As the Go program's requireEnv: no token, no proxy (it would forward the
    client's own Authorization)."""
    env = {"DASHBOARD_PROXY_URL": "http://x"}
    if token is not None:
        env["DASHBOARD_TOKEN"] = token
    with pytest.raises(ConfigError) as err:
        from_environment(env)
    assert err.value.key == "DASHBOARD_TOKEN"
    assert ("empty" if token == "" else "not set") in err.value.problem


GO = {"DASHBOARD_TOKEN": TOKEN}


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({**GO, "DASHBOARD_PROXY_URL": "ftp://x"}, "DASHBOARD_PROXY_URL"),
        ({**GO, "DASHBOARD_PROXY_URL": "dashboard:443"}, "DASHBOARD_PROXY_URL"),
        ({**GO, "DASHBOARD_PROXY_URL": "http://x", "LISTEN_ADDRESS": "8080"}, "LISTEN_ADDRESS"),
    ],
)
def test_go_sidecar_errors_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_environment(env)
    assert err.value.key == name
    assert TOKEN not in str(err.value)


def test_listen_from_go_takes_ipv6_and_ipv4_where_it_can() -> None:
    assert listen_from_go(":8080") in ("[::]:8080", "0.0.0.0:8080")
    if socket.has_ipv6 and _dual_stack():
        assert listen_from_go(":8080") == "[::]:8080"


@pytest.mark.parametrize(
    ("value", "listen"),
    [("127.0.0.1:80", "127.0.0.1:80"), ("[::1]:80", "[::1]:80"), ("0.0.0.0:80", "0.0.0.0:80")],
)
def test_listen_from_go_keeps_a_host(value: str, listen: str) -> None:
    assert listen_from_go(value) == listen


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("limit_request_line", -1, "0 to 8190"),
        ("limit_request_line", 8191, "0 to 8190"),
        ("limit_request_fields", 0, "1 to 32768"),
        ("limit_request_fields", 40000, "1 to 32768"),
        ("limit_request_field_size", 0, "at least 1"),
        ("limit_request_field_size", "16k", "int"),
    ],
)
def test_request_limits_are_checked(key: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping({"upstream": UP, "server": {key: value}})
    assert err.value.key == f"server.{key}"
    assert words in err.value.problem


def test_request_limits_reach_gunicorn() -> None:
    config = from_mapping({"upstream": UP, "server": {"limit_request_field_size": 16384}})
    settings = gunicorn_settings(config)
    assert settings["limit_request_field_size"] == 16384
    # gunicorn's own defaults otherwise
    assert (settings["limit_request_line"], settings["limit_request_fields"]) == (4094, 100)


def test_replace_keeps_the_rest() -> None:
    config = from_mapping({"upstream": UP})
    other = config.replace(source="x")
    assert isinstance(other, Config)
    assert (other.source, other.upstream) == ("x", config.upstream)


# -- _types: what a TOML value must look like ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "hint", "ok"),
    [
        (1, int, True),
        (True, int, False),
        (1.5, int, False),
        (1, float, True),
        (1.5, float, True),
        (False, float, False),
        (True, bool, True),
        (0, bool, False),
        ("x", str, True),
        (None, str, False),
        (None, str | None, True),
        (None, typing.Optional[str], True),  # noqa: UP045 - the old spelling must work too
        ("x", bool | str, True),
        (1, bool | str, False),
        ("json", Literal["json", "combined"], True),
        ("xml", Literal["json", "combined"], False),
        (["a", "b"], list[str], True),
        (["a", 1], list[str], False),
        ("ab", list[str], False),
        ([1, 2], list, True),
        ((1, 2), tuple[int, ...], True),
        ({"a": "b"}, dict[str, str], True),
        ({"a": 1}, dict[str, str], False),
        ({"a": 1}, Mapping[str, Any], True),
        (["a"], dict[str, str], False),
        ({"a": {"b": [1]}}, dict[str, Any], True),
        (object(), Any, True),
        ("x", object, True),
        (None, type(None), True),
        (0, type(None), False),
    ],
)
def test_conforms(value: Any, hint: Any, ok: bool) -> None:
    assert conforms(value, hint) is ok


@pytest.mark.parametrize(
    ("hint", "text"),
    [
        (int, "int"),
        (bool | str, "bool | str"),
        (list[str], "list[str]"),
        (dict[str, Any], "dict[str, Any]"),
    ],
)
def test_describe(hint: Any, text: str) -> None:
    assert describe(hint) == text


def test_the_upstream_section_is_the_forwarders_options_with_its_defaults() -> None:
    import dataclasses
    import inspect

    from authproxy.config import UpstreamConfig
    from authproxy.upstream.forwarder import Forwarder

    parameters = inspect.signature(Forwarder).parameters
    for field in dataclasses.fields(UpstreamConfig):
        assert field.name in parameters, field.name
        if field.name != "url":
            assert parameters[field.name].default == field.default, field.name
