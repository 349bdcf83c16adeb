"""A real browser through authproxy: headless Debian chromium, driven by selenium.

The page comes from the upstream through the proxy; it opens a WebSocket and
an EventSource back through the proxy, and the test reads from the page that
both delivered. Needs the ``chromium`` and ``chromium-driver`` packages: the
test is skipped without them, except under CI, where it fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .live_support import PATIENCE, LiveUpstream, live_config
from .support import TOKEN, Proxy

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = f"needs Debian's chromium and chromium-driver: {', '.join(missing)} missing"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="authproxy-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PATIENCE)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def live() -> Iterator[LiveUpstream]:
    server = LiveUpstream().start()
    yield server
    server.stop()


@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_a_browser_gets_its_websocket_and_event_stream_through_the_proxy(
    start_proxy: Callable[..., Proxy], live: LiveUpstream, browser: Any, worker_class: str
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proxy = start_proxy({**live_config(live, TOKEN), "server": {"worker_class": worker_class}})
    browser.get(f"{proxy.url}/page")
    wait = WebDriverWait(browser, PATIENCE)
    wait.until(lambda d: d.find_element(By.ID, "ws").text != "waiting")
    wait.until(lambda d: d.find_element(By.ID, "sse").text != "waiting")
    assert browser.find_element(By.ID, "ws").text == "echo: hello from the browser"
    assert browser.find_element(By.ID, "sse").text == "hello from sse"
    assert TOKEN not in browser.page_source
    # Both went through the pipeline: the upstream saw the injected credential.
    for path in ("/page", "/ws/echo", "/events"):
        seen = live.requests_to(path)
        assert seen, f"the upstream never saw {path}"
        assert seen[0].header("Authorization") == f"Bearer {TOKEN}"
    assert live.requests_to("/ws/echo")[0].header("Origin") == proxy.url
    browser.get("about:blank")  # closes the page's WebSocket and EventSource
    live.gate("events-done").set()
    assert live.note("closed:browser").wait(PATIENCE)
    assert proxy.access_line("/ws/echo")["status"] == 101
