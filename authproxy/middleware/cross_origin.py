"""Refuse requests another site made a browser send, before any credential is added.

The credential the proxy injects is ambient authority: a page on any origin a
logged-in user visits can make the browser send requests here, and the proxy
would sign them. This step is Go 1.25's ``net/http.CrossOriginProtection``,
plus the rule gorilla/websocket applies to handshakes: every Upgrade is unsafe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..context import refuse
from ..errors import ConfigError
from ..headers import UPGRADE_KEY

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("authproxy.cross_origin")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Whether the "off" warning was logged: ``authproxy serve`` builds the app once
#: before forking, so the workers inherit this and stay quiet.
_WARNED_DISABLED: list[bool] = []

Origin = tuple[str, str, int]  # scheme, host, port (the default port filled in)


class CrossOrigin:
    """Refuse unsafe cross-site requests and cross-site upgrades with ``403``.

    A request is judged only when it could change something: any method but
    ``GET``, ``HEAD`` and ``OPTIONS``, and every Upgrade (WebSocket) request,
    although it is a ``GET``. Such a request passes when

    - ``Sec-Fetch-Site`` is ``same-origin`` or ``none`` (typed in the address
      bar, a bookmark); any other value (``same-site``, ``cross-site``...)
      refuses it;
    - without ``Sec-Fetch-Site`` (older browsers), ``Origin`` names the host
      and port the browser asked for (the ``Host`` header; the scheme is not
      compared, since behind a TLS-terminating edge the proxy sees ``http``
      while the browser used ``https``, and a port left out means the
      scheme's default); ``Origin: null`` is cross-origin;
    - neither header is present: not a browser (curl, kubectl, scripts), or
      a same-origin request from a browser that sends neither;
    - or ``Origin`` is one of *trusted_origins*, whatever ``Sec-Fetch-Site`` says.

    A refused request never reaches the steps inside; the client gets
    ``403 Forbidden`` and the reason goes to the access log (class
    ``cross-origin``).

    :param trusted_origins: origins allowed to send cross-site requests, each
        exactly ``scheme://host[:port]`` (``https://tools.example.com``).
    :param enabled: False turns the check off (a WARNING is logged once at
        start-up): any page a user visits can then act through the proxy.

    Example::

        app = CrossOrigin(app, trusted_origins=["https://tools.example.com"])
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        trusted_origins: list[str] | tuple[str, ...] = (),
        enabled: bool = True,
    ) -> None:
        if not isinstance(enabled, bool):
            raise ConfigError("enabled", f"expected true or false, got {enabled!r}")
        if isinstance(trusted_origins, str) or not isinstance(trusted_origins, (list, tuple)):
            raise ConfigError(
                "trusted_origins", f"expected a list of origins, got {trusted_origins!r}"
            )
        self.app = app
        self.enabled = enabled
        self.trusted_origins = tuple(_trusted(o) for o in trusted_origins)
        self._trusted = frozenset(_parse_origin(o) for o in self.trusted_origins)
        if not enabled and not _WARNED_DISABLED:
            _WARNED_DISABLED.append(True)
            log.warning(
                "cross-origin protection is OFF (enabled = false): any web page a user"
                " visits can send requests that the proxy signs with the upstream credential"
            )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.enabled:
            reason = self.check(environ)
            if reason is not None:
                return refuse(environ, start_response, 403, f"cross-origin: {reason}")
        return self.app(environ, start_response)

    def check(self, environ: WSGIEnvironment) -> str | None:
        """Why the request in *environ* is refused, or None when it may pass."""
        method = environ.get("REQUEST_METHOD", "")
        # After the pipeline's sanitize the Upgrade header is gone and
        # authproxy.upgrade says what was asked; on its own the header is still there.
        upgrade = environ.get(UPGRADE_KEY) or environ.get("HTTP_UPGRADE")
        if method in SAFE_METHODS and not upgrade:
            return None
        what = f"upgrade {_shown(upgrade)}" if upgrade else method
        site = environ.get("HTTP_SEC_FETCH_SITE")
        origin = environ.get("HTTP_ORIGIN")
        if site is not None:
            if site in ("same-origin", "none"):
                return None
            if self._is_trusted(origin):
                return None
            return f"{what} with Sec-Fetch-Site {_shown(site)}"
        if origin is None:
            return None
        host = environ.get("HTTP_HOST")
        if _same_host(origin, host) or self._is_trusted(origin):
            return None
        return f"{what} from Origin {_shown(origin)} to Host {_shown(host)}"

    def _is_trusted(self, origin: str | None) -> bool:
        if origin is None or not self._trusted:
            return False
        parsed = _parse_origin(origin)
        return parsed is not None and parsed in self._trusted

    def describe(self) -> dict[str, Any]:
        """The settings, for ``check-config``."""
        if not self.enabled:
            return {"enabled": False}
        return {"trusted_origins": list(self.trusted_origins)}


def _shown(value: Any) -> str:
    """A client-supplied value for the log: quoted, escaped, cut short."""
    text = str(value)
    return repr(text if len(text) <= 80 else text[:80] + "...")


def _parse_origin(value: str) -> Origin | None:
    """``scheme://host[:port]`` as (scheme, host, port), or None if it is not one."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.path
        or parts.query
        or parts.fragment
        or "?" in value
        or "#" in value
        or value.endswith(":")
    ):
        return None
    return scheme, parts.hostname.lower(), _DEFAULT_PORTS[scheme] if port is None else port


def _trusted(value: Any) -> str:
    if not isinstance(value, str) or _parse_origin(value) is None:
        raise ConfigError(
            "trusted_origins",
            f"expected an origin, scheme://host[:port] with no path, got {value!r}",
        )
    return value


def _same_host(origin: str, host: str | None) -> bool:
    """True if *origin* names the host and port of the ``Host`` header *host*.

    A ``Host`` without a port is the default port of whichever scheme the
    browser used, so it matches an origin on its own scheme's default port.
    """
    parsed = _parse_origin(origin)
    if parsed is None or not host:
        return False
    try:
        parts = urlsplit("//" + host)
        port = parts.port
    except ValueError:
        return False
    if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username:
        return False
    scheme, origin_host, origin_port = parsed
    if parts.hostname.lower() != origin_host:
        return False
    if port is None:
        return origin_port == _DEFAULT_PORTS[scheme]
    return port == origin_port
