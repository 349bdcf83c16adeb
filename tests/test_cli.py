"""The command line: ``check-config`` output and errors, ``serve`` refusing a bad config."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authproxy.cli import _load, build_parser, main
from authproxy.config import listen_from_go

from .support import TOKEN, free_port, write_toml


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ./authproxy.toml and none of the variables that select a configuration."""
    monkeypatch.chdir(tmp_path)
    for name in ("AUTHPROXY_CONFIG", "DASHBOARD_PROXY_URL", "DASHBOARD_TOKEN", "LISTEN_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check-config", *args])
    out, err = capsys.readouterr()
    return code, out, err


def config_file(tmp_path: Path, config: dict[str, Any]) -> str:
    return str(write_toml(tmp_path / "authproxy.toml", config))


def test_check_config_prints_the_stack_with_secrets_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("API_KEY_FOR_TEST", TOKEN + "-env")
    path = config_file(
        tmp_path,
        {
            "upstream": {"url": "https://dashboard.internal", "tls_verify": False},
            "pipeline": [
                {"use": "access-log", "format": "json"},
                {
                    "use": "inject-headers",
                    "set": {
                        "Authorization": f"Bearer {TOKEN}",
                        "X-From-File": f"${{file:{token_file}}}",
                        "X-From-Env": "${env:API_KEY_FOR_TEST}",
                    },
                },
            ],
        },
    )
    code, out, err = check(capsys, "--config", path)
    assert code == 0, err
    assert TOKEN not in out and TOKEN not in err
    assert "https://dashboard.internal" in out
    assert "NOT VERIFIED" in out
    lines = out.splitlines()
    steps = [line.strip() for line in lines[lines.index("pipeline, outermost first:") + 1 : -1]]
    assert [s.split()[1] for s in steps[:-1]] == [
        "request-id",
        "access-log",
        "cross-origin",
        "inject-headers",
    ]
    assert steps[-1] == "- forwarder -> https://dashboard.internal"
    assert "Authorization" in out and "***" in out
    assert lines[-1] == "ok"


def test_check_config_from_the_go_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASHBOARD_PROXY_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DASHBOARD_TOKEN", TOKEN)
    monkeypatch.setenv("LISTEN_ADDRESS", ":8080")
    code, out, err = check(capsys)
    assert code == 0, err
    assert TOKEN not in out + err
    assert "environment (DASHBOARD_PROXY_URL, DASHBOARD_TOKEN, LISTEN_ADDRESS)" in out
    assert listen_from_go(":8080") in out
    assert "inject-headers" in out


def test_check_config_redacts_options_of_steps_without_describe(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = config_file(
        tmp_path,
        {
            "upstream": {"url": "http://127.0.0.1:9"},
            "pipeline": [{"use": "access-log", "log_headers": ["X-Api-Token"]}],
        },
    )
    code, out, _err = check(capsys, "--config", path)
    assert code == 0
    assert "log_headers" in out


BAD_CONFIGS: list[tuple[str, str, list[str]]] = [
    ("missing upstream url", "[upstream]\nread_timeout = 3\n", ["upstream.url", "required"]),
    ("no upstream at all", "[server]\nworkers = 1\n", ["upstream.url"]),
    ("bad scheme", '[upstream]\nurl = "ftp://files.internal"\n', ["upstream.url", "ftp://"]),
    (
        "bad TOML",
        '[upstream]\nurl = "http://x"\nread_timeout = \n',
        ["authproxy.toml", "invalid TOML", "line 3"],
    ),
    (
        "unknown step",
        '[upstream]\nurl = "http://x"\n[[pipeline]]\nuse = "no-such-step"\n',
        ["pipeline[0] (no-such-step).use", "unknown step", "access-log"],
    ),
    (
        "unknown option",
        '[upstream]\nurl = "http://x"\n[[pipeline]]\nuse = "access-log"\ncolour = "red"\n',
        ["pipeline[0] (access-log).colour", "unknown option", "format"],
    ),
    (
        "bad option value",
        '[upstream]\nurl = "http://x"\n[[pipeline]]\nuse = "access-log"\nformat = "xml"\n',
        ["pipeline[0] (access-log).format", "'xml'"],
    ),
    ("wrong type", '[upstream]\nurl = "http://x"\n[server]\nworkers = "2"\n', ["server.workers"]),
    ("wrong type 2", '[upstream]\nurl = "http://x"\ntls_verify = 0\n', ["upstream.tls_verify"]),
    (
        "bad health path",
        '[upstream]\nurl = "http://x"\n[health]\nready = "readyz"\n',
        ["health.ready"],
    ),
    (
        "secret in a bad template",
        f'[upstream]\nurl = "http://x"\n[[pipeline]]\nuse = "inject-headers"\n'
        f'set = {{ Authorization = "Bearer {TOKEN}${{nope:x}}" }}\n',
        ["pipeline[0] (inject-headers).set.Authorization", "unknown source"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _n, t, e in BAD_CONFIGS], ids=[n for n, _t, _e in BAD_CONFIGS]
)
def test_check_config_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: list[str]
) -> None:
    path = tmp_path / "authproxy.toml"
    path.write_text(text)
    code, out, err = check(capsys, "--config", str(path))
    assert code == 2
    assert out == ""
    assert err.startswith("authproxy: configuration error: ")
    assert "Traceback" not in err
    for words in expected:
        assert words in err
    assert TOKEN not in err


def test_check_config_step_option_of_the_wrong_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "authproxy.toml"
    path.write_text(
        '[upstream]\nurl = "http://x"\n[[pipeline]]\nuse = "access-log"\nlog_query = "yes"\n'
    )
    code, _out, err = check(capsys, "--config", str(path))
    assert code == 2
    assert "pipeline[0] (access-log).log_query" in err and "'yes'" in err


def test_check_config_without_any_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = check(capsys)
    assert code == 2
    assert "upstream.url" in err and "--config" in err


def test_listen_flag_overrides_the_file(tmp_path: Path) -> None:
    config = {"upstream": {"url": "http://x"}, "server": {"listen": "1.2.3.4:1"}}
    path = config_file(tmp_path, config)
    args = build_parser().parse_args(["serve", "--config", path, "--listen", ":9000"])
    config = _load(args)
    assert config.server.listen in ("[::]:9000", "0.0.0.0:9000")
    assert config.upstream.url == "http://x"


def test_serve_refuses_a_bad_config_before_listening(tmp_path: Path) -> None:
    """A real process: the exit status is non-zero and nothing was served."""
    port = free_port()
    path = tmp_path / "bad.toml"
    path.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n[upstream]\nurl = "gopher://x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "authproxy.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "upstream.url" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Listening" not in result.stderr


def test_check_config_console_script_exit_status(tmp_path: Path) -> None:
    path = tmp_path / "authproxy.toml"
    path.write_text('[upstream]\nurl = "http://127.0.0.1:9"\n[[pipeline]]\nuse = "nope"\n')
    cmd = [sys.executable, "-m", "authproxy.cli", "check-config", "--config", str(path)]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "pipeline[0] (nope).use" in bad.stderr
    path.write_text('[upstream]\nurl = "http://127.0.0.1:9"\n')
    good = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and good.stdout.endswith("ok\n")


# -- what a newcomer runs first ----------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHPROXY", "DASHBOARD_"))}
    return subprocess.run(
        [sys.executable, "-m", "authproxy.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
def test_serve_without_the_go_token_exits_naming_it(token: str | None) -> None:
    port = free_port()
    env = {"DASHBOARD_PROXY_URL": "http://127.0.0.1:9", "LISTEN_ADDRESS": f"127.0.0.1:{port}"}
    if token is not None:
        env["DASHBOARD_TOKEN"] = token
    result = _cli("serve", env=env)
    assert result.returncode == 2
    assert "configuration error: DASHBOARD_TOKEN" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Listening" not in result.stderr


@pytest.mark.parametrize(
    "command", ["plugins", "check-config --config authproxy.toml"], ids=["plugins", "check"]
)
def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path, command: str) -> None:
    config_file(tmp_path, {"upstream": {"url": "http://127.0.0.1:9"}})
    script = f"{sys.executable} -m authproxy.cli {command} 2>err.txt | head -n 1"
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    assert (tmp_path / "err.txt").read_text() == ""


def test_plugins_shows_every_description_whole_and_required_options_as_such() -> None:
    from authproxy import cli, plugins

    result = _cli("plugins", "identity")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "…" not in out
    declared, _ = plugins.options(plugins.installed()["identity"][0].load())
    by_name = {o.name: o for o in declared}
    assert by_name["audience"].required
    [row] = [line for line in out.splitlines() if line.split()[:1] == ["audience"]]
    assert re.match(r"\s*audience\s+str \| list\[str\]\s+required\s", row), row
    assert "None" not in row
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for option in declared:
        # Piped, each text is on its option's line, whole (for grep).
        if option.doc:
            doc = " ".join(cli._plain(option.doc).split())
            assert any(doc in line for line in lines), option.name


@pytest.mark.parametrize("width", [70, 150], ids=["below-the-options", "in-the-column"])
def test_plugins_wraps_long_descriptions_to_the_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], width: int
) -> None:
    from authproxy import cli, plugins

    monkeypatch.setattr(cli, "_wrap_width", lambda: width)
    assert main(["plugins", "identity"]) == 0
    out = capsys.readouterr().out
    option_lines = out.split("option ", 1)[1].splitlines()[1:]
    wrapped = [line for line in option_lines if line.startswith(" " * 6)]
    assert len(wrapped) > 5 and max(len(line) for line in wrapped) <= width
    if width == 150:  # the texts fit beside the option cells: every line does
        assert max(len(line) for line in option_lines) <= width
    assert "…" not in out
    declared, _ = plugins.options(plugins.installed()["identity"][0].load())
    # Wrapped, never cut: every word of every text is there, in order.
    text = "".join(out.split())
    for option in declared:
        if option.doc:
            assert "".join(cli._plain(option.doc).split()) in text, option.name


def test_unreachable_keys_warn_first_and_fail_check_config_strict(tmp_path: Path) -> None:
    dead = free_port()
    config_file(
        tmp_path,
        {
            "upstream": {"url": "http://127.0.0.1:9"},
            "pipeline": [
                {
                    "use": "identity",
                    "team_domain": "myteam.cloudflareaccess.com",
                    "audience": ["aud"],
                    "certs_url": f"http://127.0.0.1:{dead}/certs",
                    "keys_timeout": 1,
                }
            ],
        },
    )
    lenient = _cli("check-config", "--config", "authproxy.toml", cwd=tmp_path)
    assert lenient.returncode == 0
    warning = (
        f"WARNING: pipeline[0] (identity): no signing keys could be fetched from "
        f"http://127.0.0.1:{dead}/certs: every request is refused"
    )
    assert warning in lenient.stderr.splitlines()
    assert lenient.stdout.rstrip().endswith("ok, with 1 warning(s) above (--strict fails on them)")
    strict = _cli("check-config", "--strict", "--config", "authproxy.toml", cwd=tmp_path)
    assert strict.returncode == 1
    assert warning in strict.stderr.splitlines()
    assert not strict.stdout.rstrip().endswith("ok")


@pytest.mark.parametrize(
    ("url", "tls_verify", "said"),
    [
        ("http://127.0.0.1:9", True, "plain HTTP, no TLS"),
        ("HTTP://127.0.0.1:9", True, "plain HTTP, no TLS"),
        ("https://127.0.0.1:9", True, "TLS verified"),
        ("https://127.0.0.1:9", False, "TLS NOT VERIFIED (tls_verify = false)"),
    ],
)
def test_check_config_says_what_the_upstream_connection_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, tls_verify: bool, said: str
) -> None:
    path = config_file(tmp_path, {"upstream": {"url": url, "tls_verify": tls_verify}})
    code, out, _err = check(capsys, "--config", path)
    assert code == 0
    [line] = [x for x in out.splitlines() if x.startswith("upstream:")]
    assert f"({said};" in line, line


def test_the_go_listen_address_port_alone_takes_ipv6_and_ipv4(
    upstream: Any, tmp_path: Path
) -> None:
    import os
    import signal
    import socket

    import requests

    from authproxy.config import _dual_stack

    from .support import wait_for_port

    if not (socket.has_ipv6 and _dual_stack()):
        pytest.skip("this machine has no dual-stack IPv6")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHPROXY", "DASHBOARD_"))}
    env.update(DASHBOARD_PROXY_URL=upstream.url, DASHBOARD_TOKEN=TOKEN, LISTEN_ADDRESS=f":{port}")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "authproxy.cli", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=30)
            for host in ("127.0.0.1", "[::1]"):
                r = requests.get(f"http://{host}:{port}/x", timeout=30)
                assert r.status_code == 200, host
                assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert f"Listening at: http://[::]:{port}" in text, text
    assert (
        "configuration: environment (DASHBOARD_PROXY_URL, DASHBOARD_TOKEN, LISTEN_ADDRESS)" in text
    )
    assert TOKEN not in text
