"""The identity-aware proxies authproxy knows, as data, and resolving the step's options.

Each preset names where the token travels (header, cookie), where the keys
are published, who issues the token and how it is signed. The verification
code is the same for all of them; ``oidc`` is the preset with nothing preset.
"""

from __future__ import annotations

import ipaddress
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ...errors import ConfigError
from .keys import ASYMMETRIC_ALGORITHMS
from .policy import string_list


@dataclass(frozen=True)
class Provider:
    """Where a provider's token travels and how to check it.

    ``certs_url``, ``issuer`` and ``identity_url`` are templates over ``{team_domain}``.
    ``service_token_claim`` names the claim that identifies a machine client;
    ``identity_url`` is where the provider tells a person's groups
    (``groups = "access"``), for those that have such an endpoint.
    """

    header: str | None
    cookie: str | None
    certs_url: str | None
    issuer: str | None
    algorithms: tuple[str, ...]
    service_token_claim: str | None = None
    identity_url: str | None = None


PROVIDERS: Mapping[str, Provider] = types.MappingProxyType(
    {
        "cloudflare-access": Provider(
            header="Cf-Access-Jwt-Assertion",
            cookie="CF_Authorization",
            certs_url="https://{team_domain}/cdn-cgi/access/certs",
            issuer="https://{team_domain}",
            algorithms=("RS256",),
            service_token_claim="common_name",
            identity_url="https://{team_domain}/cdn-cgi/access/get-identity",
        ),
        "google-iap": Provider(
            header="X-Goog-Iap-Jwt-Assertion",
            cookie=None,
            certs_url="https://www.gstatic.com/iap/verify/public_key-jwk",
            issuer="https://cloud.google.com/iap",
            algorithms=("ES256",),
        ),
        "pomerium": Provider(
            # team_domain is the route's host: Pomerium uses it as iss and aud.
            header="X-Pomerium-Jwt-Assertion",
            cookie=None,
            certs_url="https://{team_domain}/.well-known/pomerium/jwks.json",
            issuer="{team_domain}",
            algorithms=("ES256",),
        ),
        "oidc": Provider(
            header=None, cookie=None, certs_url=None, issuer=None, algorithms=("RS256",)
        ),
    }
)


@dataclass(frozen=True)
class Settings:
    """A provider's preset with the user's options applied and checked."""

    provider: str
    header: str | None
    cookie: str | None
    certs_url: str
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...]
    service_token_claim: str | None
    #: Where groups come from: None, ``"access"`` (fetched from ``identity_url``)
    #: or ``"claim:<name>"`` (a claim of the token).
    groups: str | None = None
    identity_url: str | None = None

    @property
    def groups_claim(self) -> str | None:
        """The claim named by ``groups = "claim:<name>"``, else None."""
        if self.groups is not None and self.groups.startswith("claim:"):
            return self.groups[6:]
        return None


def resolve(
    provider: Any,
    *,
    team_domain: Any = None,
    audience: Any = None,
    certs_url: Any = None,
    issuer: Any = None,
    header: Any = None,
    cookie: Any = True,
    algorithms: Any = None,
    groups: Any = None,
    identity_url: Any = None,
) -> Settings:
    """Apply the options to *provider*'s preset; a :class:`ConfigError` names a wrong one."""
    if provider not in PROVIDERS:
        raise ConfigError("provider", f"expected one of {sorted(PROVIDERS)}, got {provider!r}")
    preset = PROVIDERS[provider]
    for key, text in (("certs_url", certs_url), ("issuer", issuer), ("header", header)):
        if text is not None and (not isinstance(text, str) or not text):
            raise ConfigError(key, f"expected a non-empty string, got {text!r}")
    if not isinstance(cookie, (str, bool)):
        raise ConfigError("cookie", f"expected true, false or a cookie name, got {cookie!r}")
    if team_domain is not None and not _is_host(team_domain):
        raise ConfigError("team_domain", f"expected a host name, got {team_domain!r}")
    header = header if header is not None else preset.header
    cookie = preset.cookie if cookie is True else (cookie or None)
    if not header and not cookie:
        raise ConfigError("header", f"provider {provider!r} needs a header (or cookie) name")
    if header is not None:
        check_header_name(header, "header")
    url = certs_url or _fill(preset.certs_url, team_domain, "certs_url")
    groups, groups_url = _groups(provider, preset, team_domain, groups, identity_url)
    return Settings(
        provider=provider,
        header=header,
        cookie=cookie,
        certs_url=_check_url(url, "certs_url"),
        issuer=issuer or _fill(preset.issuer, team_domain, "issuer"),
        audience=tuple(_audience(audience)),
        algorithms=_algorithms(algorithms, preset.algorithms),
        service_token_claim=preset.service_token_claim,
        groups=groups,
        identity_url=groups_url,
    )


def _groups(
    provider: str, preset: Provider, team_domain: Any, groups: Any, identity_url: Any
) -> tuple[str | None, str | None]:
    """The checked ``groups`` and ``identity_url`` options."""
    if groups is None:
        if identity_url is not None:
            raise ConfigError("identity_url", 'only used with groups = "access"')
        return None, None
    if not isinstance(groups, str):
        raise ConfigError("groups", f'expected "access" or "claim:<name>", got {groups!r}')
    if groups.startswith("claim:"):
        if not groups[6:].strip() or groups[6:] != groups[6:].strip():
            raise ConfigError("groups", f"expected a claim name after 'claim:', got {groups!r}")
        if identity_url is not None:
            raise ConfigError("identity_url", 'only used with groups = "access"')
        return groups, None
    if groups != "access":
        raise ConfigError("groups", f'expected "access" or "claim:<name>", got {groups!r}')
    if preset.identity_url is None:
        raise ConfigError(
            "groups",
            f'"access" needs provider = "cloudflare-access", not {provider!r};'
            ' use "claim:<name>" to read groups from the token',
        )
    if identity_url is not None and (not isinstance(identity_url, str) or not identity_url):
        raise ConfigError("identity_url", f"expected a non-empty string, got {identity_url!r}")
    url = identity_url or _fill(preset.identity_url, team_domain, "identity_url")
    return groups, _check_url(url, "identity_url")


def _audience(audience: Any) -> list[str]:
    tags = [audience] if isinstance(audience, str) else audience
    if not tags:
        raise ConfigError("audience", "required: the audience tag (or tags) tokens must carry")
    return string_list(tags, "audience")


def _algorithms(algorithms: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if algorithms is None:
        return default
    chosen = string_list(algorithms, "algorithms")
    bad = [a for a in chosen if a not in ASYMMETRIC_ALGORITHMS]
    if bad or not chosen:
        raise ConfigError(
            "algorithms",
            f"expected asymmetric algorithms from {sorted(ASYMMETRIC_ALGORITHMS)},"
            f" got {algorithms!r} (never 'none' or an HMAC algorithm)",
        )
    return tuple(chosen)


def _fill(template: str | None, team_domain: str | None, key: str) -> str:
    if template is None:
        raise ConfigError(key, "required for this provider")
    if "{team_domain}" in template and team_domain is None:
        raise ConfigError("team_domain", f"required to derive {key} (or set {key})")
    return template.format(team_domain=team_domain)


def _is_host(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(value)
        and all(c.isalnum() or c in ".-:" for c in value)
        and not value.startswith(("-", "."))
    )


def _check_url(url: str, key: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError as exc:
        raise ConfigError(key, f"not a valid URL: {url!r} ({exc})") from None
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return url
    raise ConfigError(key, f"expected an https:// URL (http:// only for loopback), got {url!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_header_name(name: str, key: str) -> None:
    if not name or any(c in name for c in " \t\r\n\0:"):
        raise ConfigError(key, f"not a valid header name: {name!r}")


# -- reading the token where it travels ----------------------------------------------


@dataclass(frozen=True)
class CookieCopies:
    """Every copy of one cookie in a ``Cookie`` header.

    ``values`` are the copies' values in order (quotes removed); ``ambiguous``
    is True when a copy hides behind a comma (how a server joins two
    ``Cookie`` headers), where parsers disagree on what the cookies are.
    """

    values: tuple[str, ...]
    ambiguous: bool


def cookie_copies(header: str, name: str) -> CookieCopies:
    """The copies of cookie *name* (matched case-insensitively) in the ``Cookie`` *header*."""
    values = [_value(piece) for piece in header.split(";") if _pair_name(piece) == name.lower()]
    # A name right after a ";" or "," or at the start: any more of those than
    # ";"-separated copies means one hides inside another cookie's value.
    hidden = len(_copy_pattern(name).findall(header)) > len(values)
    return CookieCopies(tuple(values), hidden)


def keep_one_cookie(header: str, name: str, value: str) -> str:
    """*header* with one copy of cookie *name*, the first whose value is *value*;
    the other cookies, their order and their spacing are kept byte for byte."""
    kept, found = [], False
    for piece in header.split(";"):
        if _pair_name(piece) == name.lower():
            if found or _value(piece) != value:
                continue
            found = True
        kept.append(piece)
    if kept and kept[0] != header.split(";", 1)[0]:
        kept[0] = kept[0].lstrip(" \t")  # the separator of a cookie that went
    return ";".join(kept)


def _pair_name(piece: str) -> str:
    return piece.partition("=")[0].strip().lower()


def _value(piece: str) -> str:
    value = piece.partition("=")[2].strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


_COPY_PATTERNS: dict[str, re.Pattern[str]] = {}


def _copy_pattern(name: str) -> re.Pattern[str]:
    pattern = _COPY_PATTERNS.get(name)
    if pattern is None:
        pattern = re.compile(r"(?:^|[;,])[ \t]*" + re.escape(name) + r"[ \t]*=", re.IGNORECASE)
        _COPY_PATTERNS[name] = pattern
    return pattern
