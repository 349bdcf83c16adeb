"""The README's first command: ``authproxy demo`` shows the injected header arriving."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def test_demo_self_test_shows_the_header_and_logs_without_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHPROXY", "DASHBOARD"))}
    result = subprocess.run(
        [sys.executable, "-m", "authproxy.cli", "demo", "--self-test", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "injected header arrived" in result.stdout
    token = re.search(r"injects Authorization: Bearer (demo-[0-9a-f]+)", result.stdout)
    assert token, result.stdout
    assert "curl -s http://127.0.0.1:" in result.stdout
    # The access log (stderr) has its line, and never the token.
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [(r["method"], r["path"], r["status"]) for r in lines] == [("GET", "/hello", 200)]
    assert token.group(1) not in result.stderr
