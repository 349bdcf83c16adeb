"""The container image and the gunicorn example, tested without a Docker engine.

The Dockerfile is linted with hadolint and read for the properties the image
promises; its build stage is then replayed step by step in a temporary
directory (a fresh virtual environment installed from requirements.lock) and
its ENTRYPOINT/CMD started from there: the health endpoint answers, and SIGTERM
lets an in-flight request finish before a clean exit.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from packaging.requirements import Requirement

from .conftest import bearer_config
from .support import TOKEN, Upstream, free_port, wait_for_port, write_toml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A command-line tool from the test extras (installed next to this interpreter)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


# --- reading the Dockerfile ---------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [rest for kind, rest in self.steps if kind == instruction]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    stages: list[Stage] = []
    for line in logical:
        kind, _, rest = line.partition(" ")
        kind, rest = kind.upper(), rest.strip()
        if kind == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{kind} before FROM"
            stages[-1].steps.append((kind, rest))
    return stages


def env_pairs(rest: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(rest))


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    ok = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The linter does reject what it should (untagged base, unpinned apt packages).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\n")
    refused = subprocess.run([hadolint, str(bad)], capture_output=True, text=True)
    assert refused.returncode != 0 and "DL3006" in refused.stdout


def test_image_is_multi_stage_slim_unprivileged_and_starts_authproxy(stages: list[Stage]) -> None:
    build, final = stages[0], stages[-1]
    assert len(stages) >= 2 and build.name
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[12]-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", stage.image)
    steps = " ".join(rest for _, rest in build.steps)
    assert "--require-hashes" in steps and "requirements.lock" in steps
    # The final stage only copies the built environment: no compiler, no package
    # installs, no HEALTHCHECK (Kubernetes probes /healthz and /readyz).
    kinds = [kind for kind, _ in final.steps]
    assert "HEALTHCHECK" not in kinds
    runs = " ".join(final.args("RUN"))
    assert not re.search(r"apt-get install|apk add|pip install|gcc|build-essential", runs)
    assert any(rest.startswith(f"--from={build.name} ") for rest in final.args("COPY"))
    env: dict[str, str] = {}
    for rest in final.args("ENV"):
        env.update(env_pairs(rest))
    assert env.get("PYTHONUNBUFFERED") == "1"
    user = final.args("USER")
    assert user and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", user[-1]), "numeric, non-root"
    assert json.loads(final.args("ENTRYPOINT")[-1]) == ["authproxy"]
    assert json.loads(final.args("CMD")[-1]) == ["serve"]


def test_dockerignore_lets_in_exactly_what_the_build_copies(stages: list[Stage]) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything else stays out of the build context"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for stage in stages:
        for rest in stage.args("COPY"):
            if not rest.startswith("--from="):
                copied.update(src.rstrip("/") for src in rest.split()[:-1])
    assert copied == admitted
    for path in copied:
        assert (ROOT / path).exists(), path


def test_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            pins[name] = (match.group(2), block.count("--hash=sha256:"))
    assert pins, "requirements.lock has no pins"
    for name, (version, hashes) in pins.items():
        assert hashes >= 1, f"{name}=={version} has no hash"
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} from pyproject.toml is not in requirements.lock"
        assert req.specifier.contains(pins[name][0]), f"lock pins {name}=={pins[name][0]}: {req}"


# --- the gunicorn example -----------------------------------------------------------


GUNICORN_CONF = ROOT / "examples" / "gunicorn.conf.py"


def test_gunicorn_example_settings_fit_behind_cloudflared() -> None:
    conf = runpy.run_path(str(GUNICORN_CONF))
    assert conf["worker_class"] == "authproxy.serve.worker.Worker" and conf["threads"] >= 2
    assert conf["keepalive"] > 90, "cloudflared keeps idle origin connections for 90 s"
    assert conf["header_map"] in ("drop", "refuse")
    assert "*" not in conf["forwarded_allow_ips"]
    assert conf["accesslog"] is None


def test_gunicorn_example_serves_and_drops_underscore_headers(
    upstream: Upstream, tmp_path: Path
) -> None:
    port = free_port()
    config = write_toml(tmp_path / "authproxy.toml", bearer_config(upstream))
    env = clean_env()
    env["AUTHPROXY_CONFIG"] = str(config)
    env["GUNICORN_CMD_ARGS"] = f"--bind=127.0.0.1:{port} --workers=1 --worker-tmp-dir={tmp_path}"
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [tool("gunicorn"), "-c", str(GUNICORN_CONF), "authproxy.wsgi:application"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=30)
            base = f"http://127.0.0.1:{port}"
            assert requests.get(base + "/healthz", timeout=10).status_code == 200
            r = requests.get(base + "/x", headers={"X_Probe_Id": "1", "X-Other": "2"}, timeout=10)
            assert r.status_code == 200
            seen = upstream.last()
            assert seen.header("Authorization") == f"Bearer {TOKEN}"
            assert seen.header("X-Other") == "2"
            assert "x-probe-id" not in seen.header_names(), "header_map should drop it"
        finally:
            process.send_signal(signal.SIGTERM)
            rc = process.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert rc == 0, text
    assert "Using worker: authproxy.serve.worker.Worker" in text
    assert TOKEN not in text
    # One access line per request, from authproxy's step (JSON), none from gunicorn.
    assert '"GET /x HTTP/1.1"' not in text
    assert sum(1 for line in text.splitlines() if line.startswith("{") and '"/x"' in line) == 1


# --- gunicorn run directly, with the config's [server] section -------------------------


def _test_env() -> dict[str, str]:
    """This interpreter's environment (the code under test on PYTHONPATH), no config in it."""
    drop = ("AUTHPROXY", "GUNICORN", "DASHBOARD_", "LISTEN_ADDRESS")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("worker_class", ["authproxy", "sync", "gthread"])
def test_plain_gunicorn_with_the_config_module_serves_as_server_says(
    upstream: Upstream, tmp_path: Path, worker_class: str
) -> None:
    port = free_port()
    config = bearer_config(upstream)
    config["server"] = {
        "listen": f"127.0.0.1:{port}",
        "workers": 2,
        "threads": 3,
        "worker_class": worker_class,
        "limit_request_field_size": 16384,
    }
    env = _test_env()
    env["AUTHPROXY_CONFIG"] = str(write_toml(tmp_path / "authproxy.toml", config))
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:authproxy.gunicorn_conf"]
            + ["authproxy.wsgi:application"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=30)
            deadline = time.monotonic() + 30
            while len(_children(process.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(_children(process.pid)) == 2, log.read_text(errors="replace")
            big = requests.get(
                f"http://127.0.0.1:{port}/x", headers={"Cookie": "a=" + "x" * 12_000}, timeout=30
            )
            assert big.status_code == 200, "[server] limit_request_field_size not applied"
            assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"
        finally:
            process.send_signal(signal.SIGTERM)
            rc = process.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert rc == 0, text
    assert f"Listening at: http://127.0.0.1:{port}" in text, text
    expected = {"authproxy": "authproxy.serve.worker.Worker"}.get(worker_class, worker_class)
    assert f"Using worker: {expected}" in text, text
    assert f"configuration: {env['AUTHPROXY_CONFIG']}" in text
    assert TOKEN not in text


def test_the_config_module_stops_gunicorn_on_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "authproxy.toml"
    path.write_text('[server]\nworkers = "two"\n[upstream]\nurl = "http://127.0.0.1:9"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:authproxy.gunicorn_conf"]
        + ["authproxy.wsgi:application"],
        env={**_test_env(), "AUTHPROXY_CONFIG": str(path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "authproxy: configuration error: server.workers" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("limit", "status"), [(None, 431), (16384, 200)])
def test_a_12_kib_cookie_needs_a_raised_header_line_limit(
    upstream: Upstream, start_proxy: Any, limit: int | None, status: int
) -> None:
    config = bearer_config(upstream)
    if limit is not None:
        config["server"] = {"limit_request_field_size": limit}
    proxy = start_proxy(config)
    before = len(upstream.seen)
    cookie = "session=" + "c" * (12 * 1024)
    r = requests.get(proxy.url + "/x", headers={"Cookie": cookie}, timeout=30)
    assert r.status_code == status
    if status == 200:
        assert upstream.last().header("Cookie") == cookie
    else:
        assert len(upstream.seen) == before


# --- the image's install, replayed in a fresh virtual environment ---------------------


def clean_env() -> dict[str, str]:
    drop = ("AUTHPROXY", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "GUNICORN")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


class Replay:
    """Runs a Dockerfile stage's steps with container paths mapped under *root*."""

    def __init__(self, root: Path, python_shim_dir: Path) -> None:
        self.root = root
        self.cwd = root
        self.env = clean_env()
        self.env["PATH"] = f"{python_shim_dir}{os.pathsep}{self.env.get('PATH', '')}"

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def map(self, text: str) -> str:
        # Absolute container paths the Dockerfile names become paths under root.
        pattern = r"(?<![\w.$])/(opt|src|etc|tmp)(?=/|\b)"
        return re.sub(pattern, lambda m: f"{self.root}/{m[1]}", text)

    def run_stage(self, stage: Stage) -> None:
        for kind, rest in stage.steps:
            if kind == "ENV":
                for key, value in env_pairs(rest).items():
                    # Map the Dockerfile's text first: the host's PATH has its own /tmp.
                    self.env[key] = self.map(value).replace("$PATH", self.env["PATH"])
            elif kind == "WORKDIR":
                self.cwd = self.path(rest)
                self.cwd.mkdir(parents=True, exist_ok=True)
            elif kind == "COPY" and not rest.startswith("--from="):
                *sources, dest = rest.split()
                target = self.path(dest) if dest.startswith("/") else self.cwd / dest
                for src in sources:
                    origin = ROOT / src
                    if origin.is_dir():
                        skip = shutil.ignore_patterns("__pycache__")
                        shutil.copytree(origin, target, ignore=skip)
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(origin, target / origin.name)
            elif kind == "RUN":
                result = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", self.map(rest)],
                    cwd=self.cwd,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                assert result.returncode == 0, f"RUN {rest}\n{result.stdout}\n{result.stderr}"


@pytest.mark.slow
def test_fresh_venv_from_the_lock_serves_and_stops_gracefully(
    stages: list[Stage], upstream: Upstream, tmp_path: Path
) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    root = tmp_path / "root"
    build = Replay(root, shim)
    build.run_stage(stages[0])
    venv = root / "opt" / "authproxy"
    assert not (venv / "bin" / "pip").exists(), "the image's environment carries no pip"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import authproxy; print(authproxy.__file__)"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), "imported from the worktree"

    final = Replay(root, shim)
    final.env = clean_env()  # a new stage starts from the base image's environment
    final.run_stage(
        Stage(
            stages[-1].image,
            None,
            [(kind, rest) for kind, rest in stages[-1].steps if kind in ("ENV", "WORKDIR")],
        )
    )
    (root / "tmp").mkdir(exist_ok=True)
    port = free_port()
    config: dict[str, Any] = bearer_config(upstream)
    config["server"] = {
        "listen": f"127.0.0.1:{port}",
        "workers": 1,
        "threads": 4,
        "graceful_timeout": 20.0,
    }
    write_toml(final.cwd / "authproxy.toml", config)  # found as ./authproxy.toml
    command = json.loads(stages[-1].args("ENTRYPOINT")[-1]) + json.loads(stages[-1].args("CMD")[-1])
    executable = shutil.which(command[0], path=final.env["PATH"])
    assert executable and Path(executable).is_relative_to(venv)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [executable, *command[1:]],
            cwd=final.cwd,
            env=final.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=60)
            base = f"http://127.0.0.1:{port}"
            health = requests.get(base + "/healthz", timeout=10)
            assert (health.status_code, health.text.strip()) == (200, "ok")
            assert requests.get(base + "/readyz", timeout=10).status_code == 200

            result: dict[str, Any] = {}

            def slow() -> None:
                try:
                    r = requests.get(base + "/sleep/2", timeout=60)
                    result["status"], result["body"] = r.status_code, r.text
                except requests.RequestException as exc:
                    result["error"] = exc

            client = threading.Thread(target=slow)
            client.start()
            # SIGTERM only once the upstream holds the request (it records, then sleeps).
            for _ in range(600):
                if any(s.target == "/sleep/2" for s in upstream.seen):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the slow request never reached the upstream")
            process.send_signal(signal.SIGTERM)
            client.join(timeout=60)
            rc = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text(errors="replace")
    assert result == {"status": 200, "body": "slept"}, text
    assert rc == 0, text
    assert "Traceback" not in text
    assert TOKEN not in text
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_the_gevent_extra_brings_what_gunicorns_gevent_worker_needs() -> None:
    # gunicorn's gevent worker imports packaging; its own extra declares both.
    import importlib.metadata

    extra = [r for r in importlib.metadata.requires("authproxy") or [] if 'extra == "gevent"' in r]
    assert any(r.replace(" ", "").startswith("gunicorn[gevent]") for r in extra), extra


@pytest.mark.slow
def test_the_gevent_worker_starts_from_a_fresh_venv_with_only_the_gevent_extra(
    upstream: Upstream, tmp_path: Path
) -> None:
    """``pip install 'authproxy[gevent]'`` alone is enough for ``worker_class = "gevent"``
    (gunicorn's gevent worker imports packaging, which gunicorn's own extra brings)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    source = tmp_path / "src"  # a copy: the build leaves nothing in the worktree
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "tests", "bench", "fuzz"
        ),
    )
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{source}[gevent]"],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    port = free_port()
    config = bearer_config(upstream)
    config["server"] = {"listen": f"127.0.0.1:{port}", "workers": 1, "worker_class": "gevent"}
    path = write_toml(tmp_path / "authproxy.toml", config)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "authproxy"), "serve", "--config", str(path)],
            env=clean_env(),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                wait_for_port(port, timeout=60)
            except TimeoutError:
                pytest.fail(f"authproxy serve did not start:\n{log.read_text(errors='replace')}")
            r = requests.get(f"http://127.0.0.1:{port}/x", timeout=30)
            assert (r.status_code, r.text) == (200, "ok"), log.read_text(errors="replace")
            assert upstream.last().header("Authorization") == f"Bearer {TOKEN}"
        finally:
            process.send_signal(signal.SIGTERM)
            rc = process.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert rc == 0, text
    assert "Using worker: gevent" in text and "Traceback" not in text, text


def test_one_image_name_everywhere() -> None:
    """README, Dockerfile, docs and manifests name the same image, and docs/deploy.md,
    "The image", says how to build and push it."""
    pattern = re.compile(r"[\w.<>/-]*/authproxy:[\w.<>-]+|(?<=-t )authproxy\b")
    files = [ROOT / "README.md", DOCKERFILE, *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "examples").rglob("*.yaml"))
    names = {m for path in files for m in pattern.findall(path.read_text())}
    assert names == {"registry.example.com/authproxy:0.1.0"}, names
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    section = deploy.split("## The image", 1)[1].split("\n## ", 1)[0]
    assert "docker build -t registry.example.com/authproxy:0.1.0 ." in section
    assert "docker push registry.example.com/authproxy:0.1.0" in section
