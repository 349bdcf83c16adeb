"""The WSGI entry point for running under a server of your choice::

    AUTHPROXY_CONFIG=/etc/authproxy.toml gunicorn 'authproxy.wsgi:application'

The configuration is found as ``authproxy serve`` finds it (AUTHPROXY_CONFIG,
./authproxy.toml, or the Go sidecar's variables).
"""

from __future__ import annotations

import logging

from .config import load_config
from .pipeline import build_app
from .serve.logs import configure

if not logging.getLogger("authproxy").handlers:
    configure()

application = build_app(load_config())
