"""A Flask app that checks the Cloudflare Access token itself, on every request.

Nothing reaches a view without a valid token for this app's audience; a
request that bypasses Access (a port-forward, a misrouted tunnel) gets 401.
The view reads who is calling from ``request.environ["authproxy.identity"]``.

Run it (see README.md)::

    AUTHPROXY_TEAM_DOMAIN=myteam.cloudflareaccess.com AUTHPROXY_AUDIENCE=<AUD tag> \\
        flask --app examples/flask-embed/app.py run
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask, request

from authproxy import AccessLog, Identity


def create_app(**identity_options: Any) -> Flask:
    """The app, wrapped in the identity and access-log steps.

    Options default to the environment: ``AUTHPROXY_TEAM_DOMAIN``,
    ``AUTHPROXY_AUDIENCE`` (comma-separated tags), optionally
    ``AUTHPROXY_CERTS_URL`` and, to allow only some people,
    ``AUTHPROXY_ALLOW_EMAIL_DOMAINS``. Keyword arguments override them. With
    no keyword arguments and a required variable unset, it exits with a line
    naming the variable (no traceback under ``flask run``).
    """
    app = Flask(__name__)

    @app.get("/")
    def whoami() -> dict[str, Any]:
        identity = request.environ["authproxy.identity"]
        return {
            "email": identity.email,
            "service_token": identity.service_token,
            "name": identity.name,
            "groups": identity.claims.get("groups", []),
        }

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    if not identity_options:
        missing = [n for n in _REQUIRED if not os.environ.get(n, "").strip()]
        if missing:
            # Under `flask run` an exception here would end in a traceback.
            raise SystemExit(
                f"flask-embed: set {' and '.join(missing)} (see examples/flask-embed/README.md)"
            )
    options: dict[str, Any] = {
        "provider": "cloudflare-access",
        "team_domain": os.environ.get("AUTHPROXY_TEAM_DOMAIN"),
        "audience": _list(os.environ.get("AUTHPROXY_AUDIENCE")),
        "certs_url": os.environ.get("AUTHPROXY_CERTS_URL"),  # default: from team_domain
        "allow_email_domains": _list(os.environ.get("AUTHPROXY_ALLOW_EMAIL_DOMAINS")),
        "skip_paths": ["/healthz"],  # the probe needs no identity
        **identity_options,
    }
    identity = Identity(app.wsgi_app, **options)
    app.extensions["authproxy.identity"] = identity  # for readiness checks and close()
    app.wsgi_app = AccessLog(identity, format="combined")  # type: ignore[method-assign]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return app


_REQUIRED = ("AUTHPROXY_TEAM_DOMAIN", "AUTHPROXY_AUDIENCE")


def _list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]
