"""ratelimit: bucket arithmetic, the Redis script against a real redis-server, and the
step through the full pipeline under a real gunicorn (workers and replicas sharing Redis)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from authproxy_ratelimit.buckets import MemoryBuckets, Rate, parse_rate
from authproxy_ratelimit.redis_backend import RedisBuckets

from authproxy import ConfigError, build_app
from authproxy.secrets import redact
from tests.support import TOKEN, Proxy, Upstream, assert_no_secret, free_port, wait_for_port


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's ``redis-server``) on a free loopback port, no persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        message = "redis-server is not installed (Debian package: redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


# -- rates and buckets ----------------------------------------------------------


def test_parse_rate() -> None:
    assert parse_rate("60/minute", None, "k") == Rate(60.0, 1.0, "60/minute")
    assert parse_rate(" 10 / seconds ", 3, "k") == Rate(3.0, 10.0, "10 / seconds")
    for bad in ("60", "60/fortnight", "0/second", "-1/second", "1.5/second", "x/hour"):
        with pytest.raises(ConfigError, match="expected a rate like '60/minute'"):
            parse_rate(bad, None, "per_address")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_bucket_burst_refill_and_all_or_nothing() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    two_per_second = Rate(2.0, 1.0, "")
    assert buckets.take([("a", two_per_second)]) == (0.0, -1)
    assert buckets.take([("a", two_per_second)]) == (0.0, -1)
    assert buckets.take([("a", two_per_second)]) == (1.0, 0)
    clock.now += 0.5
    assert buckets.take([("a", two_per_second)]) == (0.5, 0)
    clock.now += 0.5
    assert buckets.take([("a", two_per_second)]) == (0.0, -1)
    # "a" is empty again: a request claiming "b" and "a" is refused and takes nothing from "b".
    for _ in range(3):
        assert buckets.take([("b", two_per_second), ("a", two_per_second)]) == (1.0, 1)
    assert buckets.take([("b", two_per_second)]) == (0.0, -1)
    assert buckets.take([("b", two_per_second)]) == (0.0, -1)
    assert buckets.take([("b", two_per_second)])[1] == 0


def test_memory_buckets_stay_bounded() -> None:
    clock = Clock()
    buckets = MemoryBuckets(max_keys=100, clock=clock)
    rate = Rate(5.0, 1.0, "")
    for i in range(1000):
        buckets.take([(f"client-{i}", rate)])
        clock.now += 0.01
    assert len(buckets) <= 101
    # The most recent clients are the ones kept.
    assert buckets.take([("client-999", rate)]) == (0.0, -1)


def test_redis_bucket_burst_wait_and_all_or_nothing(redis_url: str, prefix: str) -> None:
    buckets = RedisBuckets(redis_url, prefix=prefix, timeout=5.0)
    try:
        per_hour = Rate(3.0, 3 / 3600, "")
        for _ in range(3):
            assert buckets.take([("alice", per_hour)]) == (0.0, -1)
        wait, empty = buckets.take([("alice", per_hour)])
        assert empty == 0 and 1100 < wait <= 1200
        # Refused: nothing was taken from "bob".
        assert buckets.take([("bob", per_hour), ("alice", per_hour)])[1] == 1
        for _ in range(3):
            assert buckets.take([("bob", per_hour)]) == (0.0, -1)
        assert buckets.take([("bob", per_hour)])[1] == 0
        # Keys are hashed (no email in Redis) and expire once the bucket would be full.
        keys = buckets.client.keys(prefix + "*")
        assert len(keys) == 2 and all(b"alice" not in k and b"bob" not in k for k in keys)
        assert 0 < buckets.client.pttl(keys[0]) <= 3600 * 1000 + 1000
    finally:
        buckets.close()


def test_redis_bucket_refills(redis_url: str, prefix: str) -> None:
    buckets = RedisBuckets(redis_url, prefix=prefix, timeout=5.0)
    try:
        fast = Rate(1.0, 20.0, "")  # one token, back after 50 ms
        assert buckets.take([("k", fast)]) == (0.0, -1)
        wait, empty = buckets.take([("k", fast)])
        if empty == 0:  # (on a slow machine the token may be back already)
            assert 0 < wait <= 0.05
            time.sleep(wait + 0.01)
        assert buckets.take([("k", fast)]) == (0.0, -1)
    finally:
        buckets.close()


# -- options --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "(ratelimit).per_identity: set per_identity, per_address or both"),
        ({"per_address": "5/fortnight"}, "(ratelimit).per_address: expected a rate like"),
        ({"per_address": 5}, "(ratelimit).per_address: expected str | None, got 5"),
        ({"per_address": "5/hour", "address_burst": 0}, "(ratelimit).address_burst: expected at"),
        (
            {"per_address": "5/hour", "backend": "memcached"},
            "(ratelimit).backend: expected Literal['memory', 'redis'], got 'memcached'",
        ),
        ({"per_address": "5/hour", "backend": "redis"}, "(ratelimit).redis_url: required"),
        (
            {"per_address": "5/hour", "backend": "redis", "redis_url": "http://x"},
            "(ratelimit).redis_url: expected a redis://",
        ),
        ({"per_address": "5/hour", "redis_url": "redis://x"}, "(ratelimit).redis_url: only used"),
        ({"per_address": "5/hour", "trusted_proxies": ["nope"]}, "(ratelimit).trusted_proxies"),
    ],
)
def test_option_errors(upstream: Upstream, options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_app(
            {"upstream": {"url": upstream.url}, "pipeline": [{"use": "ratelimit", **options}]}
        )
    assert expected in str(caught.value)


def test_redis_password_is_never_shown(upstream: Upstream) -> None:
    app = build_app(
        {
            "upstream": {"url": upstream.url},
            "pipeline": [
                {
                    "use": "ratelimit",
                    "per_address": "5/hour",
                    "backend": "redis",
                    "redis_url": "redis://:hunter2-redis-pw@127.0.0.1:1/0",
                }
            ],
        }
    )
    try:
        shown = str(dict(app.steps)["ratelimit"].describe())
        assert "hunter2" not in shown
        assert redact("url redis://:hunter2-redis-pw@h") == "url redis://:***@h"
    finally:
        app.close()


# -- through gunicorn -------------------------------------------------------------


def config(upstream: Upstream, *steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream.url},
        "pipeline": [
            {"use": "access-log", "format": "json"},
            {"use": "test-identity"},
            *steps,
            {"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}},
        ],
    }


def get(proxy: Proxy, path: str, **headers: str) -> requests.Response:
    # A new connection each time, so that every worker gets its share.
    headers["Connection"] = "close"
    response = requests.get(proxy.url + path, headers=headers, timeout=30)
    assert_no_secret(response)
    return response


def test_per_address_limit_in_memory(
    upstream: Upstream, start_proxy: Callable[..., Proxy], test_steps: dict[str, str]
) -> None:
    proxy = start_proxy(
        config(upstream, {"use": "ratelimit", "per_address": "3/hour"}), env=test_steps
    )
    assert [get(proxy, f"/{i}").status_code for i in range(3)] == [200, 200, 200]
    refused = get(proxy, "/3")
    assert refused.status_code == 429 and refused.text == "Too Many Requests\n"
    assert 1 <= int(refused.headers["Retry-After"]) <= 1200
    # Another client address (through the trusted loopback proxy) has its own bucket.
    assert get(proxy, "/other", **{"X-Forwarded-For": "192.0.2.1"}).status_code == 200
    proxy.stop()
    assert [s.target for s in upstream.seen] == ["/0", "/1", "/2", "/other"]
    line = next(x for x in proxy.access_lines() if x["path"] == "/3")
    assert (line["status"], line["refusal"], line["client"]) == (
        429,
        "rate limited: address",
        "127.0.0.1",
    )


def test_per_identity_limit(
    upstream: Upstream, start_proxy: Callable[..., Proxy], test_steps: dict[str, str]
) -> None:
    proxy = start_proxy(
        config(upstream, {"use": "ratelimit", "per_identity": "2/hour"}), env=test_steps
    )
    alice = {"X-Test-User": "alice@example.com"}
    robot = {"X-Test-Service": "ci-robot"}
    assert [get(proxy, "/a", **alice).status_code for _ in range(3)] == [200, 200, 429]
    assert [get(proxy, "/r", **robot).status_code for _ in range(3)] == [200, 200, 429]
    assert get(proxy, "/b", **{"X-Test-User": "bob@example.com"}).status_code == 200
    # Without an identity, only per_address would count, and it is not set.
    assert [get(proxy, "/anon").status_code for _ in range(3)] == [200, 200, 200]
    proxy.stop()
    refusals = [(x["identity"], x["refusal"]) for x in proxy.access_lines() if x["status"] == 429]
    assert refusals == [
        ("alice@example.com", "rate limited: identity"),
        ("ci-robot", "rate limited: identity"),
    ]


def test_redis_limit_holds_across_workers_and_replicas(
    upstream: Upstream,
    start_proxy: Callable[..., Proxy],
    test_steps: dict[str, str],
    redis_url: str,
    prefix: str,
) -> None:
    step = {
        "use": "ratelimit",
        "per_identity": "5/hour",
        "per_address": "1000/hour",
        "backend": "redis",
        "redis_url": redis_url,
        "key_prefix": prefix,
    }
    replicas = [
        start_proxy(config(upstream, step), env=test_steps, workers=2),
        start_proxy(config(upstream, step), env=test_steps, workers=2),
    ]
    alice = {"X-Test-User": "alice@example.com"}
    codes = [get(replicas[i % 2], f"/{i}", **alice).status_code for i in range(8)]
    assert codes == [200] * 5 + [429] * 3
    assert len(upstream.seen) == 5
    # One more from each replica: still refused, whichever worker answers.
    assert get(replicas[0], "/x", **alice).status_code == 429
    assert get(replicas[1], "/y", **alice).status_code == 429


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_down(
    upstream: Upstream,
    start_proxy: Callable[..., Proxy],
    test_steps: dict[str, str],
    fail_open: bool,
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = start_proxy(
        config(
            upstream,
            {
                "use": "ratelimit",
                "per_address": "1/hour",
                "backend": "redis",
                "redis_url": dead,
                "fail_open": fail_open,
            },
        ),
        env=test_steps,
    )
    codes = [get(proxy, "/").status_code for _ in range(3)]
    proxy.stop()
    if fail_open:
        assert codes == [200, 200, 200]
        assert proxy.logs().count("rate limit backend unavailable (ConnectionError)") == 1
    else:
        assert codes == [503, 503, 503]
        assert upstream.seen == []
        assert proxy.access_lines()[0]["refusal"] == "rate limit unavailable: ConnectionError"
