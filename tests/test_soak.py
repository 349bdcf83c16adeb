"""A soak: concurrent clients against the full stack for a while, loopback only.

Clients mix valid requests, uploads, streamed (chunked, slow) answers, refused
requests (no token, a token from an unknown key) and injected faults (the
upstream resets the connection: those, and only those, may be 5xx: a 502).
Every request carries a unique id; every answer must carry the same id back,
in the header and in the upstream's echo. The workers' RSS and open file
descriptors are sampled after a warm-up and again after the load: no leak
beyond a small margin. The figures are printed for the README.

``AUTHPROXY_SOAK_SECONDS`` (default 60) and ``AUTHPROXY_SOAK_CLIENTS``
(default 12) make it longer or wider.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest
import requests

from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims
from .scripted import Request, ScriptedUpstream, reset
from .support import TOKEN, Proxy, wait_until

SECONDS = float(os.environ.get("AUTHPROXY_SOAK_SECONDS", "60"))
CLIENTS = int(os.environ.get("AUTHPROXY_SOAK_CLIENTS", "12"))
WARM_UP = min(10.0, SECONDS / 4)
BEARER = f"Bearer {TOKEN}"
JWT_HEADER = "Cf-Access-Jwt-Assertion"

#: Allowed growth from after the warm-up to after the load, per worker.
RSS_MARGIN_KIB = 16 * 1024
FD_MARGIN = 8


def _upstream(conn: socket.socket, request: Request) -> bool:
    """Echo the id in every answer: /echo/ID, /upload/ID (digest of the body), /stream/ID
    (chunked, five pieces, a little apart), /fault/ID (a reset: the injected fault)."""
    kind, _, request_id = request.target.strip("/").partition("/")
    if request.header("Authorization") != BEARER:
        body = b"no token"
        conn.sendall(b"HTTP/1.1 500 X\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return True
    if kind == "fault":
        reset(conn)
        return False
    if kind == "stream":
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: text/event-stream\r\n\r\n"
        )
        for i in range(5):
            piece = f"data: {request_id} {i}\n\n".encode()
            conn.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
            time.sleep(0.01)
        conn.sendall(b"0\r\n\r\n")
        return True
    if kind == "upload":
        body = f"{request_id} {hashlib.sha256(request.body).hexdigest()}".encode()
    else:
        body = request_id.encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    return True


@dataclass
class Tally:
    """What the clients saw; a mismatch stops nothing but is reported at the end."""

    counts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refused_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(
        self, kind: str, request_id: str, status: int, seconds: float, problem: str | None
    ) -> None:
        with self.lock:
            if kind in ("no-token", "unknown-key"):
                self.refused_ids.add(request_id)
            self.counts[kind] += 1
            self.statuses[(kind, status)] += 1
            self.latencies.append(seconds)
            if problem and len(self.problems) < 20:
                self.problems.append(problem)


EXPECTED = {
    "echo": 200,
    "upload": 200,
    "stream": 200,
    "no-token": 401,
    "unknown-key": 403,
    "fault": 502,
}
WEIGHTS = {"echo": 50, "upload": 10, "stream": 15, "no-token": 10, "unknown-key": 10, "fault": 5}


def _client(
    url: str,
    tokens: list[str],
    strangers: list[str],
    tally: Tally,
    stop: threading.Event,
    seed: int,
) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        if kind == "unknown-key":
            headers[JWT_HEADER] = rng.choice(strangers)
        elif kind != "no-token":
            headers[JWT_HEADER] = rng.choice(tokens)
        path = {"upload": "upload", "stream": "stream", "fault": "fault"}.get(kind, "echo")
        body = rng.randbytes(rng.randrange(1, 200_000)) if kind == "upload" else None
        started = time.perf_counter()
        problem = None
        try:
            response = session.request(
                "POST" if body is not None else "GET",
                f"{url}/{path}/{request_id}",
                headers=headers,
                data=body,
                timeout=60,
            )
            status, text = response.status_code, response.text
            if status != EXPECTED[kind]:
                problem = f"{kind} {request_id}: status {status}"
            elif response.headers.get("X-Request-ID") != request_id:
                problem = f"{kind} {request_id}: id {response.headers.get('X-Request-ID')}"
            elif status == 200:
                expected = request_id
                if kind == "upload":
                    assert body is not None
                    expected = f"{request_id} {hashlib.sha256(body).hexdigest()}"
                elif kind == "stream":
                    expected = "".join(f"data: {request_id} {i}\n\n" for i in range(5))
                if text != expected:
                    problem = f"{kind} {request_id}: body {text[:80]!r}"
            if TOKEN in text or any(TOKEN in v for v in response.headers.values()):
                problem = f"{kind} {request_id}: the token in the response"
        except requests.RequestException as exc:
            status, problem = 0, f"{kind} {request_id}: {type(exc).__name__}"
            session = requests.Session()
        tally.record(kind, request_id, status, time.perf_counter() - started, problem)
    session.close()


@dataclass
class Sample:
    rss_kib: int
    fds: int


def _sample(pids: list[int]) -> dict[int, Sample]:
    out = {}
    for pid in pids:
        process = psutil.Process(pid)
        out[pid] = Sample(process.memory_info().rss // 1024, process.num_fds())
    return out


@pytest.fixture
def soak_stack() -> Iterator[tuple[Proxy, ScriptedUpstream, SigningKey]]:
    key = SigningKey("EC")
    with JwksServer([key]) as jwks:
        upstream = ScriptedUpstream(_upstream)
        proxy = Proxy(
            {
                "upstream": {"url": upstream.url},
                "server": {"workers": 2, "threads": 8},
                "pipeline": [
                    {"use": "access-log", "format": "json"},
                    {
                        "use": "identity",
                        "team_domain": TEAM_DOMAIN,
                        "audience": [AUDIENCE],
                        "certs_url": jwks.url,
                        "algorithms": ["ES256"],
                    },
                    {"use": "inject-headers", "set": {"Authorization": BEARER}},
                ],
            }
        )
        try:
            yield proxy, upstream, key
        finally:
            proxy.stop()
            upstream.stop()
    assert TOKEN not in proxy.logs()


def _load(proxy: Proxy, key: SigningKey, seconds: float, tally: Tally) -> float:
    tokens = [key.sign(claims(jti=str(i), exp=int(time.time()) + 3600)) for i in range(40)]
    stranger = SigningKey("EC")
    strangers = [stranger.sign(claims(jti=str(i))) for i in range(5)]
    stop = threading.Event()
    clients = [
        threading.Thread(target=_client, args=(proxy.url, tokens, strangers, tally, stop, i))
        for i in range(CLIENTS)
    ]
    started = time.monotonic()
    for client in clients:
        client.start()
    stop.wait(seconds)
    stop.set()
    for client in clients:
        client.join(120)
    return time.monotonic() - started


def _settled(proxy: Proxy, pids: list[int], baseline: dict[int, Sample]) -> dict[int, Sample]:
    """Sample once the kept-alive client connections are gone (gunicorn closes idle ones)."""

    def quiet() -> dict[int, Sample] | None:
        now = _sample(pids)
        return now if all(now[p].fds <= baseline[p].fds + FD_MARGIN for p in pids) else None

    try:
        return wait_until(quiet, timeout=30, what="the workers' descriptors to settle")
    except TimeoutError:
        return _sample(pids)


@pytest.mark.slow
def test_soak(
    soak_stack: tuple[Proxy, ScriptedUpstream, SigningKey], capsys: pytest.CaptureFixture[str]
) -> None:
    proxy, upstream, key = soak_stack
    pids = wait_until(lambda: len(proxy.worker_pids()) == 2 and proxy.worker_pids())
    warm = Tally()
    _load(proxy, key, WARM_UP, warm)
    assert not warm.problems, warm.problems
    before = _settled(proxy, pids, _sample(pids))
    tally = Tally()
    elapsed = _load(proxy, key, SECONDS, tally)
    after = _settled(proxy, pids, before)
    assert proxy.worker_pids() == pids, "a worker was replaced during the soak"

    total = sum(tally.counts.values())
    forwarded = sum(tally.counts[k] for k in ("echo", "upload", "stream", "fault"))
    latencies = sorted(tally.latencies)
    lines = [
        f"soak: {CLIENTS} clients, {elapsed:.0f} s, {total} requests "
        f"({total / elapsed:.0f}/s), 2 workers x 8 threads",
        "  by kind: " + ", ".join(f"{k} {tally.counts[k]}" for k in WEIGHTS),
        "  statuses: " + ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(tally.statuses.items())),
        f"  latency: p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms",
        f"  upstream requests (warm-up included): {len(upstream.requests)}, for "
        f"{forwarded + sum(warm.counts[k] for k in ('echo', 'upload', 'stream', 'fault'))} "
        "forwarded (a fault on a kept-alive connection is tried twice)",
    ]
    for pid in pids:
        lines.append(
            f"  worker {pid}: RSS {before[pid].rss_kib / 1024:.1f} -> "
            f"{after[pid].rss_kib / 1024:.1f} MiB, fds {before[pid].fds} -> {after[pid].fds}"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    assert not tally.problems, tally.problems
    assert total > CLIENTS * 10, "the soak hardly ran"
    assert all(tally.counts[k] for k in WEIGHTS), tally.counts
    # No 5xx but the injected faults' 502s; refused requests never reached the upstream.
    fives = {k: n for (k, s), n in tally.statuses.items() if s >= 500 and k != "fault"}
    assert fives == {}
    seen_ids = {r.target.rpartition("/")[2] for r in upstream.requests}
    assert tally.refused_ids and not (tally.refused_ids | warm.refused_ids) & seen_ids
    # A fault on a kept-alive connection is sent once more on a fresh one (GET is
    # idempotent), so the upstream may see a fault request twice, nothing else.
    faults = warm.counts["fault"] + tally.counts["fault"]
    others = (
        forwarded
        - tally.counts["fault"]
        + sum(warm.counts[k] for k in ("echo", "upload", "stream"))
    )
    assert others + faults <= len(upstream.requests) <= others + 2 * faults
    for pid in pids:
        assert after[pid].fds <= before[pid].fds + FD_MARGIN, (pid, before[pid], after[pid])
        assert after[pid].rss_kib <= before[pid].rss_kib + RSS_MARGIN_KIB, (
            pid,
            before[pid],
            after[pid],
        )
    assert "Traceback" not in proxy.logs()
