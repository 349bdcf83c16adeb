"""The WSGI application: Django, inside authproxy's Identity and AccessLog.

Nothing reaches a view without a valid Cloudflare Access token for this
app's audience: no token is ``401``, a bad one ``403``; one JSON access-log
line per request either way, tokens never logged.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

from authproxy import AccessLog, Identity

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_embed.settings")

application = get_wsgi_application()
application = Identity(
    application,
    provider="cloudflare-access",
    team_domain=settings.AUTHPROXY_TEAM_DOMAIN,
    audience=settings.AUTHPROXY_AUDIENCE,
    certs_url=settings.AUTHPROXY_CERTS_URL,
)
application = AccessLog(application, format="json")
