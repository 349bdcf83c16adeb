"""Live connections per pod: tunnels, streams and slow clients at default settings.

    .venv/bin/python bench/connections.py [--count 1000] [--workers authproxy,gthread]

For each worker class, starts ``authproxy serve`` with the default ``[server]``
settings (2 workers x 16 threads) in front of a one-thread loopback upstream
(tests/raw_upstream.py), then, one scenario at a time:

- ``tunnels``: *count* WebSocket upgrades held open; every tunnel echoes a
  message, then 64 KiB each way;
- ``streams``: *count* chunked event streams held open after their first
  chunk, then ended by the upstream;
- ``slow``: *count* connections that sent part of a request head and stall.

While they are open it times 200 ``/healthz`` requests (p50, p99) and reads
the workers' memory (RSS above the idle figure, per connection) and CPU
(user + system, per relayed MiB). A scenario that cannot open every
connection within 30 s reports how many it got. Prints a markdown table.
Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.raw_upstream import RawUpstream  # noqa: E402

UPGRADE = (
    b"GET /tunnel HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
PIECE = 64 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--workers", default="authproxy,gthread")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    for worker_class in args.workers.split(","):
        for scenario in ("tunnels", "streams", "slow"):
            upstream = RawUpstream()
            proxy = Proxy(upstream.url, worker_class)
            try:
                rows.append((worker_class, scenario, run(scenario, proxy, upstream, args.count)))
            finally:
                proxy.stop()
                upstream.stop()
    print(f"\n{args.count} connections, default [server] settings (2 workers x 16 threads)\n")
    print(
        "| worker | scenario | open | healthz p50 ms | p99 ms | healthz unanswered "
        "| KiB/conn | CPU ms/MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for worker_class, scenario, r in rows:
        print(
            f"| {worker_class} | {scenario} | {r['open']} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['unanswered']} | {r['kib']:.1f} | {r['cpu_per_mib']} |"
        )


class Proxy:
    def __init__(self, url: str, worker_class: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = self.dir / "authproxy.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\nworker_class = "{worker_class}"\n'
            f'log_level = "warning"\n[upstream]\nurl = "{url}"\n'
        )
        self.log = open(self.dir / "log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "authproxy.cli", "serve", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        while len(self.workers()) < 2:
            time.sleep(0.05)
        time.sleep(0.5)

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def rss_kib(self) -> int:
        total = 0
        for pid in self.workers():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.workers():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def healthz(port: int, n: int = 200) -> tuple[float, float, int]:
    """p50 and p99 of *n* ``/healthz`` requests in ms, and how many got no answer in 5 s."""
    times = []
    failed = 0
    for _ in range(n):
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), 5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
                while sock.recv(65536):
                    pass
        except OSError:
            failed += 1
            if failed >= 3:  # the proxy is not answering: do not wait for all of them
                return float("inf"), float("inf"), n - len(times)
            continue
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1], failed


def open_many(
    port: int, request: bytes, until: bytes, count: int
) -> tuple[list[socket.socket], int]:
    """*count* connections that sent *request*; how many got *until* back within 30 s."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), 10)
        sock.sendall(request)
        socks.append(sock)
    if not until:
        return socks, count
    deadline = time.monotonic() + 30
    opened = 0
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = b""
        try:
            while until not in data:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        except OSError:
            pass
        opened += until in data
    return socks, opened


def run(scenario: str, proxy: Proxy, upstream: RawUpstream, count: int) -> dict[str, object]:
    idle_rss = proxy.rss_kib()
    cpu_before = proxy.cpu_seconds()
    relayed = 0
    if scenario == "tunnels":
        socks, opened = open_many(proxy.port, UPGRADE, b"\r\n\r\n", count)
    elif scenario == "streams":
        request = b"GET /stream HTTP/1.1\r\nHost: p\r\n\r\n"
        socks, opened = open_many(proxy.port, request, b"first", count)
    else:
        socks, opened = open_many(proxy.port, b"GET /x HTTP/1.1\r\nHo", b"", count)
    p50, p99, unanswered = healthz(proxy.port)
    rss = proxy.rss_kib() - idle_rss
    if scenario == "tunnels":
        payload = os.urandom(PIECE)
        for sock in socks[: opened if opened == count else 0]:
            sock.settimeout(30)
            sock.sendall(payload)
            got = 0
            while got < PIECE:
                got += len(sock.recv(PIECE))
            relayed += 2 * PIECE
    elif scenario == "streams":
        upstream.release()
        for sock in socks[: opened if opened == count else 0]:
            sock.settimeout(30)
            data = b""
            while not data.endswith(b"0\r\n\r\n"):
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
    cpu = proxy.cpu_seconds() - cpu_before
    for sock in socks:
        sock.close()
    mib = relayed / (1024 * 1024)
    return {
        "open": f"{opened}/{count}",
        "p50": p50,
        "p99": p99,
        "unanswered": unanswered,
        "kib": rss / max(opened, 1),
        "cpu_per_mib": f"{cpu * 1000 / mib:.1f}" if mib else "-",
    }


if __name__ == "__main__":
    main()
