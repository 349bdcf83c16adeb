"""A real browser through authproxy: headless Debian chromium, driven by selenium.

The page comes from the upstream through the proxy; it opens a WebSocket and
an EventSource back through the proxy, and the test reads from the page that
both delivered. Needs the ``chromium`` and ``chromium-driver`` packages: the
test is skipped without them, except under CI, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


@pytest.mark.parametrize("worker_class", ["authproxy", "gevent"])
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


# -- another origin's page cannot act through the proxy ----------------------------------

#: Sends a POST (no-cors: the page cannot read the answer, but the request goes
#: out) and opens a WebSocket to *base*, and writes what happened into the page.
ATTACK_PAGE = """<!doctype html>
<title>attack</title>
<p id="post">waiting</p><p id="ws">waiting</p>
<script>
const base = %s || location.origin;
const show = (id, text) => { document.getElementById(id).textContent = text; };
fetch(base + "/attack/post", {method: "POST", mode: "no-cors", body: "x=1"})
  .then(r => show("post", r.type === "opaque" ? "opaque" : "status " + r.status))
  .catch(() => show("post", "failed"));
const ws = new WebSocket(base.replace(/^http/, "ws") + "/ws/echo?id=" + %s);
ws.onopen = () => ws.send("hi");
ws.onmessage = (e) => { show("ws", "echo: " + e.data); ws.close(); };
ws.onerror = () => show("ws", "failed");
</script>
"""


def attack_page(base: str, name: str) -> bytes:
    return (ATTACK_PAGE % (json.dumps(base), json.dumps(name))).encode()


class AttackUpstream(LiveUpstream):
    """The live upstream, also serving the page at ``/attack/page`` (same-origin then)."""

    def route_attack_page(self, environ: Any, start_response: Any, args: Any) -> Any:
        body = attack_page("", "same")
        start_response(
            "200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(body)))]
        )
        return [body]


@pytest.fixture
def other_origin() -> Iterator[Callable[[bytes], str]]:
    """Serve a page from another origin (another port): returns its URL."""
    servers: list[ThreadingHTTPServer] = []

    def serve(page: bytes) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_origin_cannot_post_or_open_a_websocket_through_the_proxy(
    start_proxy: Callable[..., Proxy], browser: Any, other_origin: Callable[[bytes], str]
) -> None:
    """The attack of a logged-in user's browser: the other origin's POST never
    reaches the upstream and its WebSocket fails; the same page served through the
    proxy (same origin) does both."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    live = AttackUpstream().start()
    try:
        proxy = start_proxy(live_config(live, TOKEN))
        wait = WebDriverWait(browser, PATIENCE)

        def outcome() -> tuple[str, str]:
            wait.until(
                lambda d: (
                    "waiting"
                    not in (d.find_element(By.ID, "post").text, d.find_element(By.ID, "ws").text)
                )
            )
            return browser.find_element(By.ID, "post").text, browser.find_element(By.ID, "ws").text

        browser.get(other_origin(attack_page(proxy.url, "xsite")))
        assert outcome() == ("opaque", "failed")
        for path in ("/attack/post", "/ws/echo"):
            line = proxy.access_line(path)
            assert line["status"] == 403 and line["refusal"].startswith("cross-origin"), line
        assert live.requests_to("/attack/post") == [] and live.requests_to("/ws/echo") == []

        browser.get(f"{proxy.url}/attack/page")
        assert outcome() == ("status 200", "echo: hi")
        (post,) = live.requests_to("/attack/post")
        assert post.header("Authorization") == f"Bearer {TOKEN}"
        (ws,) = live.requests_to("/ws/echo")
        assert ws.header("Origin") == proxy.url
        browser.get("about:blank")
        assert live.note("closed:same").wait(PATIENCE)
    finally:
        live.stop()
