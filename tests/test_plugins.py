"""The plugin API, through throwaway plugin distributions.

In-process tests put a ``*.dist-info`` with an ``entry_points.txt`` on a
temporary ``sys.path`` entry; the gunicorn test pip-installs a real wheel into
the running environment (and uninstalls it afterwards), so a fresh process
finds it the way it finds any installed plugin.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.test import Client, EnvironBuilder

from authproxy import ConfigError, PluginError, build_app, cli, plugins
from authproxy.errors import PluginError as _PluginError

from .support import TOKEN, Proxy, Upstream, write_toml

ROOT = Path(__file__).resolve().parent.parent
MODULE = "authproxy_sample_steps"

SAMPLE_SOURCE = textwrap.dedent(
    '''
    """Sample steps for authproxy's own tests."""
    from __future__ import annotations

    from dataclasses import dataclass
    from typing import TYPE_CHECKING, Literal

    from authproxy.context import (
        IDENTITY, UPSTREAM_URL, VerifiedIdentity, identity_of, refuse, register_secret,
    )

    if TYPE_CHECKING:
        from _typeshed.wsgi import WSGIApplication


    class HeaderIdentity:
        """Tests only: believe X-Test-User as the verified identity."""

        def __init__(self, app: WSGIApplication, /) -> None:
            self.app = app

        def __call__(self, environ, start_response):
            user = environ.pop("HTTP_X_TEST_USER", None)
            if user:
                environ[IDENTITY] = VerifiedIdentity(subject="sub-" + user, email=user)
            return self.app(environ, start_response)


    class Mark:
        """Append a tag to X-Trail going in, and an X-Trail-Out header coming back."""

        def __init__(self, app: WSGIApplication, /, *, tag: str) -> None:
            self.app = app
            self.tag = tag

        def __call__(self, environ, start_response):
            prior = environ.get("HTTP_X_TRAIL")
            environ["HTTP_X_TRAIL"] = f"{prior},{self.tag}" if prior else self.tag

            def start(status, headers, exc_info=None):
                return start_response(status, [*headers, ("X-Trail-Out", self.tag)], exc_info)

            return self.app(environ, start)


    class Gate:
        """Refuse the listed identities; tell the upstream who passed.

        :param deny: names refused.
        :param status: the status they get.
        """

        def __init__(self, app: WSGIApplication, /, *, deny: list[str], status: int = 403):
            self.app = app
            self.deny = frozenset(deny)
            self.status = status

        def __call__(self, environ, start_response):
            identity = identity_of(environ)
            if identity is None:
                return refuse(environ, start_response, 401, "gate: no identity")
            if identity.name in self.deny:
                return refuse(environ, start_response, self.status, f"gate: {identity.name} denied")
            environ["HTTP_X_SEEN_IDENTITY"] = identity.name
            environ["HTTP_X_SEEN_UPSTREAM"] = environ[UPSTREAM_URL]
            return self.app(environ, start_response)


    class Boom:
        """Raise on requests under a path."""

        def __init__(self, app: WSGIApplication, /, *, path: str = "/boom", secret: str = ""):
            self.app = app
            self.path = path
            self.secret = secret
            register_secret(secret)

        def __call__(self, environ, start_response):
            if environ["PATH_INFO"].startswith(self.path):
                raise RuntimeError(f"broken step holding {self.secret}")
            return self.app(environ, start_response)


    def typed(
        app: WSGIApplication,
        /,
        *,
        count: int,
        ratio: float = 0.5,
        names: list[str] | None = None,
        mode: Literal["fast", "safe"] = "safe",
        api_token: str = "",
    ) -> WSGIApplication:
        """A function factory with typed options.

        :param count: how many.
        """
        if count < 0:
            raise ValueError(f"count: expected a number >= 0, got {count}")
        return app


    @dataclass
    class DataOptions:
        limit: int
        label: str = "x"


    def data_step(app, /, **options):
        """Options declared by a dataclass."""
        DataOptions(**options)
        return app


    data_step.authproxy_options = DataOptions
    '''
)

SAMPLE_STEPS = {
    "sample-identity": f"{MODULE}:HeaderIdentity",
    "sample-mark": f"{MODULE}:Mark",
    "sample-gate": f"{MODULE}:Gate",
    "sample-boom": f"{MODULE}:Boom",
    "sample-typed": f"{MODULE}:typed",
    "sample-data": f"{MODULE}:data_step",
}


def _metadata(name: str, version: str, summary: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {summary}\n"


def _entry_points(steps: dict[str, str]) -> str:
    return "[authproxy.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in steps.items())


def make_dist_info(root: Path, name: str, version: str, steps: dict[str, str]) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(_metadata(name, version, "sample steps"))
    (info / "entry_points.txt").write_text(_entry_points(steps))


def build_wheel(dest: Path, name: str, version: str, steps: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding the sample module and its entry points."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{MODULE}.py": SAMPLE_SOURCE,
        f"{info}/METADATA": _metadata(name, version, "sample steps"),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": _entry_points(steps),
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture
def sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The sample distribution on a temporary sys.path entry."""
    root = tmp_path / "site"
    root.mkdir()
    (root / f"{MODULE}.py").write_text(SAMPLE_SOURCE)
    make_dist_info(root, "authproxy-sample", "1.0", SAMPLE_STEPS)
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop(MODULE, None)


@pytest.fixture
def clash(sample: Path) -> Path:
    """A second distribution claiming the name ``sample-mark``."""
    make_dist_info(sample, "authproxy-sample-clash", "2.0", {"sample-mark": f"{MODULE}:Gate"})
    return sample


def build(upstream: Upstream, steps: list[dict[str, Any]]) -> Any:
    return build_app({"upstream": {"url": upstream.url}, "pipeline": steps})


def call(app: Any, path: str) -> tuple[str, bytes]:
    """One request, the way a PEP 3333 server makes it (werkzeug's test client
    re-raises any ``exc_info`` given to start_response, which a server must not
    do before the headers are sent)."""
    status: list[str] = []

    def start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    body = app(EnvironBuilder(path=path).get_environ(), start_response)
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    return status[-1], data


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    import json

    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "authproxy.access"]


# -- discovery and listing ----------------------------------------------------


def test_installed_plugin_is_discovered_with_its_distribution(sample: Path) -> None:
    found = plugins.installed()
    assert [p.distribution for p in found["sample-mark"]] == ["authproxy-sample 1.0"]
    # The built-ins come through the same entry-point group.
    assert found["access-log"][0].dist_name == "authproxy"


def test_plugins_command_lists_name_distribution_summary_and_options(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("sample-gate  (") :].split("\n\n")[0]
    assert "authproxy-sample 1.0" in block
    assert "Refuse the listed identities; tell the upstream who passed." in block
    assert re.search(r"deny\s+list\[str\]\s+required\s+names refused\.", block)
    assert re.search(r"status\s+int\s+403\s+the status they get\.", block)
    typed_block = out[out.index("sample-typed  (") :].split("\n\n")[0]
    assert re.search(r"mode\s+Literal\['fast', 'safe'\]\s+'safe'", typed_block)
    data_block = out[out.index("sample-data  (") :].split("\n\n")[0]
    assert re.search(r"limit\s+int\s+required", data_block)
    assert re.search(r"label\s+str\s+'x'", data_block)


def test_plugins_command_for_one_step(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins", "sample-mark"]) == 0
    out = capsys.readouterr().out
    assert "sample-mark  (authproxy-sample 1.0" in out and "sample-gate" not in out
    assert cli.main(["plugins", "no-such-step"]) == 1


# -- ordering -----------------------------------------------------------------


def test_config_order_is_wrap_order_first_outermost(sample: Path, upstream: Upstream) -> None:
    app = build(upstream, [{"use": "sample-mark", "tag": t} for t in ("a", "b", "c")])
    try:
        response = Client(app).get("/x")
        assert response.status_code == 200
        # Going in, the first listed step runs first ...
        assert upstream.last().header("X-Trail") == "a,b,c"
        # ... and coming back, it is the last to touch the response.
        assert response.headers.getlist("X-Trail-Out") == ["c", "b", "a"]
        assert [name for name, _ in app.steps] == ["cross-origin", *["sample-mark"] * 3]
    finally:
        app.close()


# -- option errors ------------------------------------------------------------

OPTION_ERRORS = [
    (
        {"use": "sample-typed", "count": 1, "cuont": 2},
        ["pipeline[0] (sample-typed).cuont", "unknown option", "2", "did you mean 'count'"],
    ),
    (
        {"use": "sample-typed"},
        ["pipeline[0] (sample-typed).count", "required option missing", "expected int"],
    ),
    ({"use": "sample-typed", "count": "3"}, ["(sample-typed).count", "expected int, got '3'"]),
    ({"use": "sample-typed", "count": True}, ["(sample-typed).count", "expected int, got True"]),
    (
        {"use": "sample-typed", "count": 1, "names": ["a", 2]},
        ["(sample-typed).names", "expected list[str] | None, got ['a', 2]"],
    ),
    (
        {"use": "sample-typed", "count": 1, "mode": "reckless"},
        ["(sample-typed).mode", "expected Literal['fast', 'safe'], got 'reckless'"],
    ),
    (
        {"use": "sample-typed", "count": -1},
        ["pipeline[0] (sample-typed)", "count: expected a number >= 0, got -1"],
    ),
    ({"use": "sample-data"}, ["(sample-data).limit", "required option missing, expected int"]),
    (
        {"use": "sample-data", "limit": 1, "label": 7},
        ["(sample-data).label", "expected str, got 7"],
    ),
    (
        {"use": "sample-data", "limit": 1, "colour": "red"},
        ["(sample-data).colour", "unknown option (value 'red')", "label, limit"],
    ),
    (
        {"use": "sample-gate", "deny": "mallory"},
        ["(sample-gate).deny", "expected list[str], got 'mallory'"],
    ),
    (
        {"use": "sample-mrak", "tag": "x"},
        ["pipeline[0] (sample-mrak).use", "did you mean 'sample-mark'?"],
    ),
    # Built-in steps are checked by the same code (their annotations name
    # types imported only for type checkers; that must not switch checks off).
    ({"use": "access-log", "log_query": "yes"}, ["(access-log).log_query", "expected bool"]),
]


@pytest.mark.parametrize(("step", "expected"), OPTION_ERRORS)
def test_option_errors_name_plugin_option_value_and_expectation(
    sample: Path, upstream: Upstream, step: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(PluginError) as caught:
        build(upstream, [step])
    message = str(caught.value)
    for part in expected:
        assert part in message, message
    assert isinstance(caught.value, ConfigError)


def test_option_error_never_echoes_a_credential(sample: Path, upstream: Upstream) -> None:
    with pytest.raises(PluginError) as caught:
        build(upstream, [{"use": "sample-typed", "count": 1, "bearer_token": TOKEN}])
    assert "bearer_token" in str(caught.value) and TOKEN not in str(caught.value)


def test_option_error_exits_2_from_the_command_line(
    sample: Path, upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_toml(
        tmp_path / "authproxy.toml",
        {"upstream": {"url": upstream.url}, "pipeline": [{"use": "sample-mark", "tag": 5}]},
    )
    assert cli.main(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "pipeline[0] (sample-mark).tag: expected str, got 5" in err


# -- name clashes -------------------------------------------------------------


def test_two_distributions_claiming_a_name_is_an_error_naming_both(
    clash: Path, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(_PluginError) as caught:
        build(upstream, [{"use": "sample-mark", "tag": "a"}])
    message = str(caught.value)
    assert "'sample-mark'" in message
    assert "authproxy-sample 1.0" in message and "authproxy-sample-clash 2.0" in message
    # Other steps of the same distributions still work.
    build(upstream, [{"use": "sample-identity"}]).close()
    assert cli.main(["plugins", "sample-mark"]) == 0
    assert "also claimed by authproxy-sample-clash 2.0" in capsys.readouterr().out


# -- what a plugin sees and does ----------------------------------------------


@pytest.fixture
def gated(sample: Path, upstream: Upstream) -> Iterator[Client]:
    app = build(
        upstream,
        [
            {"use": "access-log", "format": "json"},
            {"use": "sample-identity"},
            {"use": "sample-gate", "deny": ["mallory@example.com"], "status": 451},
        ],
    )
    yield Client(app)
    app.close()


def test_plugin_sees_identity_and_upstream_url(gated: Client, upstream: Upstream) -> None:
    response = gated.get("/", headers={"X-Test-User": "alice@example.com"})
    assert response.status_code == 200
    assert upstream.last().header("X-Seen-Identity") == "alice@example.com"
    assert upstream.last().header("X-Seen-Upstream") == upstream.url


def test_plugin_refusal_reaches_client_as_status_and_log_as_reason(
    gated: Client, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    response = gated.get("/", headers={"X-Test-User": "mallory@example.com"}, buffered=True)
    assert response.status_code == 451
    # The client learns nothing of the reason.
    assert b"mallory" not in response.data and b"gate" not in response.data
    assert upstream.seen == []
    (line,) = access_lines(caplog)
    assert line["status"] == 451
    assert line["refusal"] == "gate: mallory@example.com denied"
    assert line["identity"] == "mallory@example.com"


def test_raising_plugin_gives_generic_500_logged_with_its_name(
    sample: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    app = build(upstream, [{"use": "access-log"}, {"use": "sample-boom"}])
    try:
        assert call(app, "/boom/now") == ("500 Internal Server Error", b"Internal Server Error\n")
        assert call(app, "/fine") == ("200 OK", b"ok")
    finally:
        app.close()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failures] == ["step 'sample-boom' failed on /boom/now"]
    assert [line["status"] for line in access_lines(caplog)] == [500, 200]


# -- a pip-installed plugin under gunicorn -------------------------------------


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def pip_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"), "authproxy-sample", "1.0", SAMPLE_STEPS)
    _pip("install", "--no-deps", "--no-index", str(wheel))
    try:
        yield "authproxy-sample"
    finally:
        _pip("uninstall", "-y", "authproxy-sample")


def test_pip_installed_plugin_under_gunicorn(
    pip_installed: str, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "authproxy.cli", "plugins", "sample-gate"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "sample-gate  (authproxy-sample 1.0" in listing
    secret = "step-secret-0b6d2f19"
    proxy = start_proxy(
        {
            "upstream": {"url": upstream.url},
            "pipeline": [
                {"use": "access-log", "format": "json"},
                {"use": "sample-identity"},
                {"use": "sample-gate", "deny": ["mallory@example.com"]},
                {"use": "sample-boom", "secret": secret},
                {"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}},
            ],
        },
        workers=2,
    )

    def get(path: str, user: str) -> requests.Response:
        return requests.get(proxy.url + path, headers={"X-Test-User": user}, timeout=30)

    ok = get("/a", "alice@example.com")
    assert ok.status_code == 200
    assert upstream.last().header("X-Seen-Identity") == "alice@example.com"
    assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"
    refused = get("/b", "mallory@example.com")
    assert refused.status_code == 403 and refused.text == "Forbidden\n"
    broken = get("/boom", "bob@example.com")
    assert broken.status_code == 500 and broken.text == "Internal Server Error\n"
    assert TOKEN not in broken.text and secret not in broken.text
    proxy.stop()
    lines = {line["path"]: line for line in proxy.access_lines()}
    assert lines["/a"]["refusal"] is None and lines["/a"]["status"] == 200
    assert lines["/b"]["refusal"] == "gate: mallory@example.com denied"
    assert lines["/b"]["status"] == 403
    assert lines["/boom"]["status"] == 500
    logs = proxy.logs()
    assert "step 'sample-boom' failed on /boom" in logs
    # The traceback is logged, with the step's registered secret redacted.
    assert "broken step holding ***" in logs and secret not in logs
    assert len(upstream.seen) == 1


# -- the docs' minimal plugin is the example's, and is short -------------------


def test_docs_minimal_plugin_is_the_example_and_under_30_lines() -> None:
    example = (ROOT / "examples/custom-plugin/authproxy_readonly.py").read_text()
    docs = (ROOT / "docs/plugins.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, re.S)
    assert example in blocks, "docs/plugins.md must show examples/custom-plugin verbatim"
    assert len(example.splitlines()) < 30


# -- the guide's examples ----------------------------------------------------------------------


GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.S)


def test_the_guides_pyproject_is_the_examples_whole_file() -> None:
    example = GUIDE.parent.parent / "examples" / "custom-plugin" / "pyproject.toml"
    assert example.read_text() in _blocks("toml")


def test_the_guides_inject_headers_response_table_is_valid(upstream: Upstream) -> None:
    import tomllib

    [block] = [b for b in _blocks("toml") if "response = " in b]
    step = tomllib.loads(block)["pipeline"][0]
    app = build(upstream, [step])
    try:
        response = Client(app).get("/x")
        assert response.headers["Cache-Control"] == "no-store"
    finally:
        app.close()


def test_the_guides_response_header_step_works() -> None:
    [block] = [b for b in _blocks("python") if "def with_no_store" in b]
    namespace: dict[str, Any] = {}
    exec(compile(block, str(GUIDE), "exec"), namespace)  # noqa: S102 - our own docs

    def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        cached = environ["PATH_INFO"].endswith("/cached")
        headers = [("Cache-Control", "max-age=60")] if cached else []
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])
        return [b"ok"]

    client = Client(namespace["NoStoreForApi"](inner, prefix="/api/"))
    assert client.get("/api/pods").headers.getlist("Cache-Control") == ["no-store"]
    assert client.get("/api/cached").headers.getlist("Cache-Control") == ["max-age=60"]
    assert "Cache-Control" not in client.get("/ui").headers
    assert client.get("/api/pods").data == b"ok"
