"""metrics through the full pipeline under a real gunicorn: counts, bounded labels,
and correct sums across gunicorn workers in prometheus-client's multiprocess mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from authproxy import ConfigError, build_app
from tests.support import TOKEN, Proxy, Upstream, assert_no_secret

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(proxy: Proxy) -> Samples:
    response = requests.get(proxy.url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def settled(proxy: Proxy, requests_seen: int) -> Samples:
    """A scrape once every request so far is recorded: a step records a request
    when the server closes its response, which may be just after the client has it."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(proxy)
        if total(samples, "authproxy_requests_total") >= requests_seen:
            return samples
        assert time.monotonic() < deadline, f"{requests_seen} requests never all recorded"
        time.sleep(0.05)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def labels(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls), _ in samples.items() if n == name}


def pipeline(upstream: Upstream, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream.url},
        "pipeline": [
            {"use": "access-log", "format": "json"},
            {"use": "metrics", **metrics},
            {"use": "test-refusal"},
            {"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}},
        ],
    }


def test_counts_latency_refusals_and_bytes(
    upstream: Upstream, start_proxy: Callable[..., Proxy], test_steps: dict[str, str]
) -> None:
    proxy = start_proxy(
        pipeline(upstream, {"routes": {"api": "^/api/", "assets": r"\.js$"}}), env=test_steps
    )
    sent: list[requests.Response] = []

    def go(method: str, path: str, **kwargs: Any) -> requests.Response:
        response = requests.request(method, proxy.url + path, timeout=30, **kwargs)
        assert_no_secret(response)
        sent.append(response)
        return response

    for i in range(3):
        assert go("GET", f"/api/v1/pods/{i}").status_code == 200
    assert go("POST", "/api/v1/pods", data=b"x" * 1234).status_code == 200
    assert go("GET", "/static/app.js").status_code == 200
    assert go("GET", "/status/404").status_code == 404
    assert go("GET", "/bytes/100000").status_code == 200
    assert go("PROPFIND", "/dav").status_code == 200
    # Refusals: 30 with one reason class (details differ), then 25 more classes.
    for i in range(30):
        headers = {"X-Test-Refuse": f"not allowed: user-{i}@example.com"}
        assert go("GET", f"/u/{i}", headers=headers).status_code == 403
    for i in range(25):
        go("GET", "/c", headers={"X-Test-Refuse": f"class {i}: detail"})

    m = settled(proxy, len(sent))
    assert value(m, "authproxy_requests_total", route="api", method="GET", status="2xx") == 3
    assert value(m, "authproxy_requests_total", route="api", method="POST", status="2xx") == 1
    assert value(m, "authproxy_requests_total", route="assets", method="GET", status="2xx") == 1
    assert value(m, "authproxy_requests_total", route="other", method="GET", status="4xx") == 56
    assert value(m, "authproxy_requests_total", route="other", method="other", status="2xx") == 1
    assert total(m, "authproxy_requests_total") == len(sent) == 63
    assert total(m, "authproxy_request_duration_seconds_count") == 63
    # Only requests that reached the upstream have an upstream latency.
    assert value(m, "authproxy_upstream_duration_seconds_count", route="api") == 4
    assert value(m, "authproxy_upstream_duration_seconds_count", route="other") == 3
    assert value(m, "authproxy_refusals_total", status="403", reason="not allowed") == 30
    # At most 20 reason classes per process: "not allowed", 19 more, the rest "other".
    assert value(m, "authproxy_refusals_total", status="403", reason="other") == 6
    assert len(labels(m, "authproxy_refusals_total", "reason")) == 21
    assert total(m, "authproxy_response_bytes_total") == sum(len(r.content) for r in sent)
    assert value(m, "authproxy_request_bytes_total", route="api") == 1234
    # Bounded labels: nothing from the request itself became a label value.
    assert labels(m, "authproxy_requests_total", "route") == {"api", "assets", "other"}
    for (_, ls), _v in m.items():
        for _k, v in ls:
            assert "@" not in v and "user-" not in v and "/" not in v
    # The metrics path is answered locally and not counted.
    assert "/metrics" not in [s.target for s in upstream.seen]
    assert total(scrape(proxy), "authproxy_requests_total") == 63
    assert requests.head(proxy.url + "/metrics", timeout=30).status_code == 200
    assert requests.post(proxy.url + "/metrics", timeout=30).status_code == 405


def test_metrics_path_restricted_to_peers(
    upstream: Upstream, start_proxy: Callable[..., Proxy], test_steps: dict[str, str]
) -> None:
    proxy = start_proxy(pipeline(upstream, {"allow_from": ["10.0.0.0/8"]}), env=test_steps)
    # The direct peer decides, not a forwarded header.
    refused = requests.get(
        proxy.url + "/metrics", headers={"X-Forwarded-For": "10.1.1.1"}, timeout=30
    )
    assert refused.status_code == 403 and "authproxy_" not in refused.text
    proxy.stop()
    assert proxy.access_lines()[0]["refusal"] == "metrics: address not allowed"
    assert upstream.seen == []


class HoldingUpstream(Upstream):
    """``/hold`` answers only once ``release`` is set; ``held`` is set when it arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.release = threading.Event()

    def _answer(self, path: str, query: str, start_response: Any) -> Any:
        if path == "/hold":
            self.held.set()
            self.release.wait(60)
        return super()._answer(path, query, start_response)


@pytest.fixture
def holding_upstream() -> Iterator[HoldingUpstream]:
    server = HoldingUpstream().start()
    yield server
    server.release.set()
    server.stop()


def test_multiprocess_mode_sums_every_worker(
    holding_upstream: HoldingUpstream,
    start_proxy: Callable[..., Proxy],
    test_steps: dict[str, str],
    tmp_path: Path,
) -> None:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    config = pipeline(holding_upstream, {"routes": {"api": "^/api/"}})
    # One request at a time per worker (gunicorn turns sync into gthread if threads > 1).
    config["server"] = {"worker_class": "sync", "threads": 1}
    proxy = start_proxy(
        config, env={**test_steps, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}, workers=2
    )
    # Hold one worker busy in a request: everything else goes to the other one.
    held = threading.Thread(
        target=requests.get, args=(proxy.url + "/hold",), kwargs={"timeout": 60}
    )
    held.start()
    try:
        assert holding_upstream.held.wait(30), "the held request never reached the upstream"
        for i in range(5):
            response = requests.get(
                proxy.url + f"/api/{i}", headers={"Connection": "close"}, timeout=30
            )
            assert response.status_code == 200
    finally:
        holding_upstream.release.set()
        held.join(60)
    settled(proxy, 6)
    # Two workers recorded values ...
    pids = {p.stem.rpartition("_")[2] for p in multiproc.glob("counter_*.db")}
    assert len(pids) == 2, sorted(p.name for p in multiproc.iterdir())
    # ... and every scrape, whichever worker answers it, shows all of them.
    for _ in range(4):
        m = scrape(proxy)
        assert value(m, "authproxy_requests_total", route="api", method="GET", status="2xx") == 5
        assert value(m, "authproxy_requests_total", route="other", method="GET", status="2xx") == 1
        assert total(m, "authproxy_request_duration_seconds_count") == 6


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"path": "metrics"}, "(metrics).path: expected a path starting with '/'"),
        ({"routes": {"api": "("}}, "(metrics).routes.api: not a regular expression: '('"),
        ({"routes": {"a b": "x"}}, "(metrics).routes.a b: expected a name"),
        ({"routes": {"other": "x"}}, "(metrics).routes.other: expected a name"),
        ({"routes": ["^/api"]}, "(metrics).routes: expected dict[str, str] | None, got ['^/api']"),
        ({"buckets": [1, 0.5]}, "(metrics).buckets: expected increasing positive seconds"),
        ({"prefix": "1x"}, "(metrics).prefix: expected a metric name"),
        ({"allow_from": ["everyone"]}, "(metrics).allow_from: expected CIDR networks"),
    ],
)
def test_option_errors(upstream: Upstream, options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_app({"upstream": {"url": upstream.url}, "pipeline": [{"use": "metrics", **options}]})
    assert expected in str(caught.value)


def test_multiproc_dir_must_exist(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR: expected a writable dir"):
        build_app({"upstream": {"url": upstream.url}, "pipeline": [{"use": "metrics"}]})


def test_two_pipelines_in_one_process(upstream: Upstream) -> None:
    # Each step has its own registry: building twice (as check-config and
    # serve do) never trips over already-registered metric names.
    apps = [
        build_app({"upstream": {"url": upstream.url}, "pipeline": [{"use": "metrics"}]})
        for _ in range(2)
    ]
    for app in apps:
        app.close()
    first, second = (dict(app.steps)["metrics"] for app in apps)
    assert first.registry is not second.registry
