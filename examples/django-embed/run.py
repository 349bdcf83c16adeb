#!/usr/bin/env python3
"""Try the example in one command, no Cloudflare account needed::

    python examples/django-embed/run.py              # serve on 127.0.0.1:8001, print a curl line
    python examples/django-embed/run.py --self-test  # one request with a token, one without; exit

A local stand-in for Cloudflare Access publishes a key and signs a token;
the Django app, wrapped in ``Identity`` and ``AccessLog``, checks it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from django_embed.local_access import (  # noqa: E402
    AUDIENCE,
    TEAM_DOMAIN,
    LocalAccess,
    QuietHandler,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8001")
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    access = LocalAccess().start()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="django_embed.settings",
        AUTHPROXY_TEAM_DOMAIN=TEAM_DOMAIN,
        AUTHPROXY_AUDIENCE=AUDIENCE,
        AUTHPROXY_CERTS_URL=access.certs_url,
    )
    from django_embed.wsgi import application
    from werkzeug.serving import make_server

    host, _, port = args.listen.rpartition(":")
    port_number = 0 if args.self_test else int(port)
    server = make_server(
        host, port_number, application, threaded=True, request_handler=QuietHandler
    )
    url = f"http://{host}:{server.server_port}/"
    token = access.token("you@example.com")
    if not args.self_test:
        print(f"curl -H 'Cf-Access-Jwt-Assertion: {token}' {url}", flush=True)
        print(f"curl {url}    # no token: 401", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            return 0
        finally:
            access.stop()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        request = urllib.request.Request(url, headers={"Cf-Access-Jwt-Assertion": token})
        with urllib.request.urlopen(request, timeout=30) as response:
            print(response.status, response.read().decode())
        try:
            urllib.request.urlopen(url, timeout=30)
        except urllib.error.HTTPError as exc:
            print(exc.code, "without a token")
    finally:
        server.shutdown()
        access.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
