"""``ip-allow``: allow or deny requests by the client's address."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from authproxy.context import ClientAddress, in_networks, parse_networks, refuse
from authproxy.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["IpAllow"]
__version__ = "0.1.0"


class IpAllow:
    """Allow or deny requests by the client's address (CIDR lists).

    :param allow: networks allowed in; when empty, every address not denied is.
    :param deny: networks refused, even when they are also in ``allow``.
    :param trusted_proxies: CIDR networks whose ``client_ip_header`` is believed.
        Left unset (with ``client_ip_header``), the step judges the address the
        access log shows: the one ``access-log`` resolved when it runs earlier in
        the pipeline, else the access log's defaults (loopback trusted).
    :param client_ip_header: the header a trusted proxy puts the client's address in
        (``X-Forwarded-For``; ``Cf-Connecting-Ip`` behind cloudflared).
    :param status: the status a refused request gets.

    A refusal is logged with the reason ``address denied`` or ``address not
    allowed``; an address that does not parse is never allowed by ``allow``.

    Example::

        [[pipeline]]
        use = "ip-allow"
        allow = ["10.0.0.0/8", "192.168.0.0/16"]
        deny = ["10.66.0.0/16"]
    """

    def __init__(
        self,
        app: WSGIApplication,
        /,
        *,
        allow: list[str] | None = None,
        deny: list[str] | None = None,
        trusted_proxies: list[str] | None = None,
        client_ip_header: str | None = None,
        status: int = 403,
    ) -> None:
        if not allow and not deny:
            raise ConfigError("allow", "set allow, deny or both: with neither, nothing is checked")
        if not 400 <= status <= 599:
            raise ConfigError("status", f"expected an error status (400-599), got {status!r}")
        self.app = app
        self.allow = parse_networks(allow or (), "allow")
        self.deny = parse_networks(deny or (), "deny")
        self.client = ClientAddress(
            trusted_proxies=trusted_proxies, client_ip_header=client_ip_header
        )
        self.status = status

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        address = self.client(environ)
        if self.deny and in_networks(address, self.deny):
            return refuse(environ, start_response, self.status, "address denied: in deny list")
        if self.allow and not in_networks(address, self.allow):
            return refuse(environ, start_response, self.status, "address not allowed: not in allow")
        return self.app(environ, start_response)

    def describe(self) -> dict[str, Any]:
        """What ``authproxy check-config`` shows."""
        return {
            "allow": [str(n) for n in self.allow],
            "deny": [str(n) for n in self.deny],
            "client address": "as the access log"
            if self.client.follow_access_log
            else f"{self.client.header} from {[str(n) for n in self.client.trusted]}",
            "status": self.status,
        }
