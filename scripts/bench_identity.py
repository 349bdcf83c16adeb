#!/usr/bin/env python3
"""Benchmark (not a test) of the identity step; run from the repository root:

    .venv/bin/python scripts/bench_identity.py [--seconds 10] [--rounds 3]

1. The step alone, in-process: time per request with the verified-token cache
   off (a signature check every time) and on (the same token reused).
2. Requests/s, and the workers' CPU time per request, through ``authproxy
   serve`` (gunicorn, 2 workers x 16 threads; access-log, [identity,]
   inject-headers) in front of nginx, identity off vs on, the same token
   reused, driven by wrk. Needs ``nginx`` and ``wrk``. CPU per request is the
   steadier figure when other work shares the machine.

Everything listens on 127.0.0.1. Numbers from a shared machine are noisy:
compare the best of several alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from authproxy.middleware.identity import Identity  # noqa: E402
from tests.jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims  # noqa: E402
from tests.support import TOKEN, free_port, wait_for_port, write_toml  # noqa: E402

HEADER = "Cf-Access-Jwt-Assertion"


def step_cost(jwks: JwksServer, key: SigningKey, token: str) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b""]

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        assert status.startswith("200"), status

    for label, size, n in (("cache off (verify)", 0, 2000), ("cache hit", 4096, 50000)):
        identity = Identity(
            app,
            team_domain=TEAM_DOMAIN,
            audience=AUDIENCE,
            certs_url=jwks.url,
            token_cache_size=size,
        )
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_CF_ACCESS_JWT_ASSERTION": token}
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                identity(dict(environ), start_response)
            best = min(best, (time.perf_counter() - started) / n)
        identity.close()
        print(f"identity step alone, {label:18s}: {best * 1e6:7.1f} us/request")


def throughput(jwks: JwksServer, token: str, seconds: int, rounds: int) -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"skipping the throughput benchmark: {', '.join(missing)} not installed")
        return
    work = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    up_port = free_port()
    (work / "nginx.conf").write_text(
        textwrap.dedent(f"""
        worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log; daemon off;
        events {{ worker_connections 1024; }}
        http {{ access_log off; client_body_temp_path {work}; proxy_temp_path {work};
          fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};
          server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 "{"x" * 100}"; }} }} }}
    """)
    )
    nginx = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)])
    results: dict[str, list[float]] = {"off": [], "on": []}
    try:
        wait_for_port(up_port)
        for _ in range(rounds):
            for mode in ("off", "on"):
                results[mode].append(_one_run(work, up_port, jwks, token, mode, seconds))
                print(f"identity {mode:3s}: {results[mode][-1]:8.0f} req/s", flush=True)
    finally:
        nginx.terminate()
        nginx.wait(10)
    off, on = max(results["off"]), max(results["on"])
    print(
        f"best of {rounds}: identity off {off:.0f} req/s, on {on:.0f} req/s "
        f"({100 * (on / off - 1):+.1f}%)"
    )


def _one_run(
    work: Path, up_port: int, jwks: JwksServer, token: str, mode: str, seconds: int
) -> float:
    port = free_port()
    pipeline: list[dict[str, Any]] = [{"use": "access-log", "format": "json"}]
    if mode == "on":
        pipeline.append(
            {
                "use": "identity",
                "team_domain": TEAM_DOMAIN,
                "audience": [AUDIENCE],
                "certs_url": jwks.url,
            }
        )
    pipeline.append({"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}})
    config = write_toml(
        work / f"{mode}.toml",
        {
            "server": {"listen": f"127.0.0.1:{port}", "workers": 2, "threads": 16},
            "upstream": {"url": f"http://127.0.0.1:{up_port}"},
            "pipeline": pipeline,
        },
    )
    with open(work / f"{mode}.log", "wb") as log:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "authproxy.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}/small"
        subprocess.run(
            ["curl", "-sf", "-o", "/dev/null", "-H", f"{HEADER}: {token}", url], check=True
        )
        cpu_before = _cpu_seconds(proxy.pid)
        out = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{seconds}s", "-H", f"{HEADER}: {token}", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        cpu = _cpu_seconds(proxy.pid) - cpu_before
        if "Non-2xx" in out:
            raise RuntimeError(f"non-2xx responses with identity {mode}:\n{out}")
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        assert rps and total, out
        print(
            f"  worker CPU per request with identity {mode}: "
            f"{cpu / int(total.group(1)) * 1e6:.0f} us",
            flush=True,
        )
        return float(rps.group(1))
    finally:
        proxy.terminate()
        proxy.wait(30)


def _cpu_seconds(master: int) -> float:
    """User + system CPU of the gunicorn workers (children of *master*), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    total = 0
    for pid in children:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    key = SigningKey("RSA")
    token = key.sign(claims(exp=int(time.time()) + 3600))
    with JwksServer([key]) as jwks:
        step_cost(jwks, key, token)
        throughput(jwks, token, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
