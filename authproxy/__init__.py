"""authproxy: an identity-aware reverse proxy as a composable WSGI pipeline.

::

    from authproxy import Forwarder, Identity, InjectHeaders, AccessLog, build_app

    app = Forwarder("https://dashboard.internal")
    app = InjectHeaders(app, set={"Authorization": "Bearer ${file:/var/run/token}"})
    app = Identity(app, provider="cloudflare-access",
                   team_domain="myteam.cloudflareaccess.com", audience="<AUD tag>")
    app = AccessLog(app)

``Impersonate`` (between ``InjectHeaders`` and ``Identity``) makes a Kubernetes
upstream act as the verified person instead of as the injected service account.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .config import Config, load_config
from .context import VerifiedIdentity, refuse, register_secret
from .errors import (
    AuthproxyError,
    ConfigError,
    PluginError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .middleware.access_log import AccessLog
from .middleware.cross_origin import CrossOrigin
from .middleware.health import Health
from .middleware.impersonate import Impersonate
from .middleware.inject import InjectHeaders
from .middleware.request_id import RequestId
from .pipeline import Pipeline, build_app
from .upstream.forwarder import Forwarder

if TYPE_CHECKING:
    from .middleware.identity import Identity


def __getattr__(name: str) -> Any:
    # Identity pulls in PyJWT and cryptography: load them only when used.
    if name == "Identity":
        from .middleware.identity import Identity

        return Identity
    raise AttributeError(f"module 'authproxy' has no attribute {name!r}")


__all__ = [
    "AccessLog",
    "AuthproxyError",
    "Config",
    "ConfigError",
    "CrossOrigin",
    "Forwarder",
    "Health",
    "Identity",
    "Impersonate",
    "InjectHeaders",
    "Pipeline",
    "PluginError",
    "RequestId",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "VerifiedIdentity",
    "build_app",
    "load_config",
    "refuse",
    "register_secret",
]
