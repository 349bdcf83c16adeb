"""gunicorn settings from the config's ``[server]`` section, for running gunicorn yourself::

    AUTHPROXY_CONFIG=/etc/authproxy/authproxy.toml \\
        gunicorn -c python:authproxy.gunicorn_conf 'authproxy.wsgi:application'

The configuration is found as ``authproxy serve`` and ``authproxy.wsgi`` find
it (``AUTHPROXY_CONFIG``, ``./authproxy.toml``, or the Go sidecar's
variables), and every setting comes from
:func:`authproxy.serve.gunicorn.gunicorn_settings`, the same function ``authproxy
serve`` uses: listen address, workers, threads, worker class, timeouts,
keep-alive, ``forwarded_allow_ips``, ``forwarder_headers`` (none), request
limits, logging. gunicorn's command line and ``GUNICORN_CMD_ARGS`` still override any of them
(``GUNICORN_CMD_ARGS="--max-requests=1000"``).

Without this module, ``gunicorn 'authproxy.wsgi:application'`` runs with
gunicorn's own defaults (``127.0.0.1:8000``, one sync worker) whatever
``[server]`` says.

A config error ends gunicorn before it binds, with the key and the problem.
"""

from __future__ import annotations

import sys

from .config import load_config
from .errors import ConfigError
from .serve.gunicorn import gunicorn_settings
from .serve.logs import configure

# The source line ("configuration: ...") and any warning about the Go
# variables are logged while loading, before gunicorn sets up its logging.
configure()
try:
    _config = load_config()
except ConfigError as exc:
    # gunicorn would print a traceback for an exception here.
    print(f"authproxy: configuration error: {exc}", file=sys.stderr)
    sys.exit(2)

globals().update(gunicorn_settings(_config))
