"""Django settings: no database, no apps; the identity settings come from the environment.

``AUTHPROXY_TEAM_DOMAIN`` (``myteam.cloudflareaccess.com``), ``AUTHPROXY_AUDIENCE``
(the Access application's AUD tag; several, comma-separated) and, optionally,
``AUTHPROXY_CERTS_URL`` (default: derived from the team domain).
"""

from __future__ import annotations

import os
import secrets

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_hex(32)
DEBUG = False
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
ROOT_URLCONF = "django_embed.urls"
WSGI_APPLICATION = "django_embed.wsgi.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "message"}},
    "formatters": {"message": {"format": "%(message)s"}},
    # authproxy's access log: one JSON line per request.
    "loggers": {"authproxy.access": {"handlers": ["stderr"], "level": "INFO"}},
}

AUTHPROXY_TEAM_DOMAIN = os.environ.get("AUTHPROXY_TEAM_DOMAIN", "")
AUTHPROXY_AUDIENCE = [a for a in os.environ.get("AUTHPROXY_AUDIENCE", "").split(",") if a]
AUTHPROXY_CERTS_URL = os.environ.get("AUTHPROXY_CERTS_URL") or None
