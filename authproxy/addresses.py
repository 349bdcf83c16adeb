"""The client's address behind trusted proxies, shared by the access log and plugins.

A request that reaches authproxy through cloudflared or a load balancer comes
from that proxy's address; the client's own address is in a header the proxy
adds (``X-Forwarded-For``, ``Cf-Connecting-Ip``). That header is believed only
when the peer is one of the *trusted proxies*, and then only up to the
nearest address that is not itself a trusted proxy.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import ConfigError
from .headers import environ_key

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What the access log trusts unless told otherwise: the pod itself (cloudflared sidecar).
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")
DEFAULT_CLIENT_IP_HEADER = "X-Forwarded-For"
#: Where the access log leaves the address it resolved, for the steps inside it.
CLIENT_ADDRESS = "authproxy.client_address"


def parse_networks(values: Iterable[str], key: str) -> tuple[Network, ...]:
    """CIDR strings to networks (host bits allowed); a :class:`ConfigError` naming *key* if not."""
    if isinstance(values, str):
        raise ConfigError(key, f"expected a list of CIDR networks, got {values!r}")
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"expected CIDR networks, {exc}") from None


def in_networks(address: str, networks: Iterable[Network]) -> bool:
    """True if *address* parses and lies in one of *networks* (IPv4-mapped IPv6 counts as IPv4)."""
    if not isinstance(networks, tuple):
        networks = tuple(networks)
    if len(address) > _LONGEST_CACHED:  # no address, or a long scoped one: not worth a cache slot
        return _in_networks(address, networks)
    return _in_networks_cached(address, networks)


# The longest textual IPv6 address (an IPv4-mapped one) is 45 characters.
_LONGEST_CACHED = 64


def _in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


# The same few addresses (the tunnel's, a load balancer's) come with every
# request, and parsing one costs more than the rest of the lookup.
_in_networks_cached = functools.lru_cache(maxsize=4096)(_in_networks)


def client_address(environ: WSGIEnvironment, trusted: tuple[Network, ...], header_key: str) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy,
    the nearest untrusted address in *header_key* (X-Forwarded-For style).
    A hop that is not an address ends the search: the peer is the client."""
    peer: str = environ.get("REMOTE_ADDR") or "-"
    forwarded: str | None = environ.get(header_key)
    if not forwarded or not trusted or not in_networks(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_address(hop):
            # Not an address (a name, "unknown", a forged log line): nothing
            # from here on is believed, the peer is the client.
            return peer
        if not in_networks(hop, trusted):
            return hop
    return hops[0] if hops else peer


def is_address(text: str) -> bool:
    """True if *text* is a plain IPv4 or IPv6 address (no port, no brackets, no zone)."""
    if len(text) > _LONGEST_CACHED or "%" in text:
        return False
    return _is_address(text)


@functools.lru_cache(maxsize=4096)
def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class ClientAddress:
    """Find the client's address the way the access log does.

    :param trusted_proxies: CIDR networks whose ``client_ip_header`` is believed.
    :param client_ip_header: the header such a proxy adds (``X-Forwarded-For``,
        ``Cf-Connecting-Ip`` behind cloudflared).

    With both left as ``None`` the helper follows the access log: it returns
    the address the ``access-log`` step resolved (``environ["authproxy.client_address"]``,
    set when that step runs first), and otherwise applies the access log's
    defaults (loopback trusted, ``X-Forwarded-For``). Give either option to
    decide independently. A step exposes the two as its own options and
    builds one of these at construction; an option error names *prefix* + key.

    Example::

        self.client = ClientAddress(trusted_proxies=trusted_proxies)
        ...
        address = self.client(environ)
    """

    def __init__(
        self,
        *,
        trusted_proxies: list[str] | None = None,
        client_ip_header: str | None = None,
        prefix: str = "",
    ) -> None:
        self.follow_access_log = trusted_proxies is None and client_ip_header is None
        self.trusted = parse_networks(
            DEFAULT_TRUSTED_PROXIES if trusted_proxies is None else trusted_proxies,
            prefix + "trusted_proxies",
        )
        header = DEFAULT_CLIENT_IP_HEADER if client_ip_header is None else client_ip_header
        if not isinstance(header, str) or not header or any(c in header for c in " :\r\n\0"):
            raise ConfigError(
                prefix + "client_ip_header", f"expected a header name, got {client_ip_header!r}"
            )
        self.header = header
        self.header_key = environ_key(header)

    def __call__(self, environ: WSGIEnvironment) -> str:
        if self.follow_access_log:
            resolved = environ.get(CLIENT_ADDRESS)
            if isinstance(resolved, str):
                return resolved
        return client_address(environ, self.trusted, self.header_key)
