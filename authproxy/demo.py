"""``authproxy demo``: a local echo upstream with the proxy in front, no outside services.

The upstream answers every request with a JSON echo of what it received, so
``curl`` through the proxy shows the injected ``Authorization`` header
arriving, and the proxy's access log (on stderr) shows that it never logs it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import urllib.request
from typing import TYPE_CHECKING, Any

from werkzeug.serving import make_server
from werkzeug.wsgi import get_input_stream

from .pipeline import build_app
from .serve.logs import configure

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def echo_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    """Echo the request line and headers back as JSON."""
    body = get_input_stream(environ).read()
    received = {
        "method": environ["REQUEST_METHOD"],
        "path": environ.get("RAW_URI") or environ.get("PATH_INFO"),
        "headers": {
            k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")
        },
        "body_bytes": len(body),
    }
    data = (json.dumps(received, indent=2, sort_keys=True) + "\n").encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _serve(app: Any, host: str, port: int) -> Any:
    server = make_server(host, port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_demo(listen: str = "127.0.0.1:8000", self_test: bool = False) -> int:
    configure()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the access log says it all
    host, _, port = listen.rpartition(":")
    upstream = _serve(echo_app, "127.0.0.1", 0)
    upstream_url = f"http://127.0.0.1:{upstream.server_port}"
    token = "demo-" + os.urandom(6).hex()
    pipeline = build_app(
        {
            "upstream": {"url": upstream_url},
            "pipeline": [
                {"use": "access-log", "format": "json"},
                {"use": "inject-headers", "set": {"Authorization": f"Bearer {token}"}},
            ],
        }
    )
    proxy = _serve(pipeline, host or "127.0.0.1", int(port))
    proxy_url = f"http://{host or '127.0.0.1'}:{proxy.server_port}"
    print(
        f"authproxy demo\n"
        f"  upstream (echoes what it receives): {upstream_url}\n"
        f"  proxy: {proxy_url} -> injects Authorization: Bearer {token}\n\n"
        f"Try it (the upstream's echo shows the injected header; the access log on\n"
        f"stderr shows one line per request without it):\n\n"
        f"  curl -s {proxy_url}/hello\n",
        flush=True,
    )
    try:
        if self_test:
            with urllib.request.urlopen(f"{proxy_url}/hello?demo=1", timeout=10) as response:
                echoed = json.loads(response.read())
            print(json.dumps(echoed, indent=2, sort_keys=True))
            ok = echoed["headers"].get("Authorization") == f"Bearer {token}"
            print("injected header arrived" if ok else "injected header MISSING", flush=True)
            return 0 if ok else 1
        print("Ctrl-C to stop.", flush=True)
        threading.Event().wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        proxy.shutdown()
        upstream.shutdown()
        pipeline.close()
        sys.stdout.flush()
