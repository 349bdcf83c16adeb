"""Header injection through a real gunicorn: rotation under load, start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from .support import Upstream


def test_token_file_rotation_under_load(
    upstream: Upstream, start_proxy: Any, tmp_path: Path
) -> None:
    old, new = "old-rotating-token-111", "new-rotating-token-222"
    token = tmp_path / "token"
    token.write_text(old)
    interval = 0.5
    proxy = start_proxy(
        {
            "upstream": {"url": upstream.url},
            "pipeline": [
                {"use": "access-log"},
                {
                    "use": "inject-headers",
                    "set": {"Authorization": f"Bearer ${{file:{token}}}"},
                    "file_check_interval": interval,
                },
            ],
        },
        workers=1,
    )
    stop = time.monotonic() + 4.0
    failures: list[str] = []

    def load() -> None:
        with requests.Session() as s:
            while time.monotonic() < stop:
                try:
                    sent = time.monotonic()
                    r = s.get(f"{proxy.url}/load?sent={sent!r}", timeout=10)
                    if r.status_code != 200:
                        failures.append(str(r.status_code))
                except requests.RequestException as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    staged = tmp_path / "token.next"
    staged.write_text(new + "\n")
    rotated_at = time.monotonic()
    os.replace(staged, token)  # how the kubelet swaps a projected token: a new inode
    for t in threads:
        t.join()

    assert not failures, failures[:5]
    values = [
        (s.at, float(s.target.partition("?sent=")[2]), s.header("Authorization"))
        for s in upstream.seen
    ]
    assert len(values) > 20
    assert {v for _, _, v in values} == {f"Bearer {old}", f"Bearer {new}"}
    first_new = min(at for at, _, v in values if v == f"Bearer {new}")
    assert first_new >= rotated_at
    # Once the new value went out, the old one never does again (one worker):
    # every request sent after that carries the new one. (One already in flight
    # may have built its headers just before the switch.)
    assert all(v == f"Bearer {new}" for _, sent, v in values if sent > first_new)
    # And it went out within the check interval (plus scheduling slack).
    assert first_new - rotated_at < interval + 1.5
    proxy.stop()
    logs = proxy.logs()
    assert old not in logs and new not in logs


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHPROXY", "DASHBOARD"))}
    return subprocess.run(
        [sys.executable, "-m", "authproxy.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_missing_token_file_stops_serve_before_it_listens(tmp_path: Path) -> None:
    config = tmp_path / "authproxy.toml"
    config.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n'
        '[[pipeline]]\nuse = "inject-headers"\n'
        f'set = {{ Authorization = "Bearer ${{file:{tmp_path}/missing}}" }}\n'
    )
    result = run_cli("serve", "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "pipeline[0] (inject-headers).set.Authorization" in result.stderr
    assert "missing" in result.stderr


def test_check_config_shows_sources_not_values(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("file-token-never-shown")
    config = tmp_path / "authproxy.toml"
    config.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n'
        '[[pipeline]]\nuse = "inject-headers"\n'
        f'set = {{ Authorization = "Bearer ${{file:{token}}}", X-Env = "${{env:AP_ENV_VALUE}}" }}\n'
    )
    result = run_cli(
        "check-config", "--config", str(config), env={"AP_ENV_VALUE": "env-never-shown"}
    )
    assert result.returncode == 0, result.stderr
    assert "file-token-never-shown" not in result.stdout + result.stderr
    assert "env-never-shown" not in result.stdout + result.stderr
    assert '"Authorization": "*** (from literal, file)"' in result.stdout
    assert '"X-Env": "*** (from env)"' in result.stdout
