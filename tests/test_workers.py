"""authproxy's gthread worker: gunicorn's, with a heartbeat that is not per request."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from authproxy.workers import ThreadWorker

from .conftest import bearer_config


class Beats:
    def __init__(self) -> None:
        self.count = 0

    def notify(self) -> None:
        self.count += 1


def worker(timeout: float) -> Any:
    w = ThreadWorker.__new__(ThreadWorker)  # no gunicorn arbiter needed for the heartbeat
    w.timeout = timeout
    w.tmp = Beats()
    return w


def test_the_heartbeat_is_touched_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    w = worker(timeout=15)
    for _ in range(100):
        w.notify()
    assert w.tmp.count == 1
    now[0] += 0.5
    w.notify()
    assert w.tmp.count == 1
    now[0] += 0.6
    w.notify()
    assert w.tmp.count == 2


def test_a_short_timeout_gets_a_faster_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    w = worker(timeout=1)  # gunicorn passes half the configured timeout
    w.notify()
    now[0] += 0.3
    w.notify()
    assert w.tmp.count == 2


def test_busy_and_idle_workers_outlive_a_short_timeout(upstream: Any, start_proxy: Any) -> None:
    """With timeout = 2 the arbiter kills a worker silent for 2 s: under load and
    idle alike, the throttled heartbeat must still reach it in time."""
    config = bearer_config(upstream)
    config["server"] = {"timeout": 2, "workers": 2, "threads": 2}
    proxy = start_proxy(config)
    pids = sorted(proxy.worker_pids())
    with requests.Session() as session:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert session.get(proxy.url + "/", timeout=10).status_code == 200
    time.sleep(4)
    assert sorted(proxy.worker_pids()) == pids
    assert "WORKER TIMEOUT" not in proxy.logs()
    assert "authproxy.workers.ThreadWorker" in proxy.logs()
