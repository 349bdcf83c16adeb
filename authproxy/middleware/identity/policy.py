"""Who may pass the identity step, and which paths need no identity at all."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...context import VerifiedIdentity, request_path
from ...errors import ConfigError

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment


class Policy:
    """Who may pass: any one matching rule; no rules at all lets every identity pass.

    The lists combine by "or": an identity passes when its email is listed, or
    its domain, or its service token, or one of its groups (exact,
    case-sensitive, as Kubernetes RBAC compares them), or a claim holds an
    accepted value.
    """

    def __init__(
        self,
        *,
        emails: list[str] | None,
        domains: list[str] | None,
        service_tokens: list[str] | None,
        claims: Mapping[str, str | list[str]] | None,
        groups: list[str] | None = None,
    ) -> None:
        self.emails = frozenset(e.lower() for e in string_list(emails, "allow_emails"))
        self.domains = frozenset(
            d.lower().lstrip("@") for d in string_list(domains, "allow_email_domains")
        )
        self.service_tokens = frozenset(string_list(service_tokens, "allow_service_tokens"))
        if claims is not None and not isinstance(claims, Mapping):
            raise ConfigError("allow_claims", f"expected a table of claim = values, got {claims!r}")
        self.claims = {
            name: frozenset(string_list([v] if isinstance(v, str) else v, f"allow_claims.{name}"))
            for name, v in (claims or {}).items()
        }
        self.groups = frozenset(string_list(groups, "allow_groups"))
        self.open = not (
            self.emails or self.domains or self.service_tokens or self.claims or self.groups
        )

    def allows(self, identity: VerifiedIdentity) -> bool:
        if self.open:
            return True
        if identity.email:
            email = identity.email.lower()
            if email in self.emails or email.rpartition("@")[2] in self.domains:
                return True
        if identity.service_token is not None and identity.service_token in self.service_tokens:
            return True
        if self.groups and not self.groups.isdisjoint(identity.groups):
            return True
        for name, accepted in self.claims.items():
            value = identity.claims.get(name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, str) and v in accepted for v in values):
                return True
        return False

    def describe(self) -> dict[str, Any] | str:
        if self.open:
            return "any verified identity"
        return {
            "emails": sorted(self.emails),
            "email_domains": sorted(self.domains),
            "service_tokens": sorted(self.service_tokens),
            "groups": sorted(self.groups),
            "claims": {k: sorted(v) for k, v in self.claims.items()},
        }


class SkipPaths:
    """Exact paths and ``prefix/*`` patterns that pass without an identity.

    Matched on :func:`~authproxy.context.request_path` (the forwarded target,
    dot segments and ``..;`` resolved). A path that some upstream might still
    resolve elsewhere (an encoded ``/`` or ``\\``, a ``%25``, ``%00``, a
    backslash, ``//``) never matches.
    """

    # "%25" too: a double-encoded "%2e%2e" is ".." to an upstream that decodes twice.
    _SUSPICIOUS = ("%2f", "%5c", "%25", "%00", "\\", "//")

    def __init__(self, patterns: list[str] | None) -> None:
        exact, prefixes = set(), []
        for pattern in string_list(patterns, "skip_paths"):
            if not pattern.startswith("/") or any(c in pattern for c in "?#\\"):
                raise ConfigError("skip_paths", f"expected a path like /static/*, got {pattern!r}")
            if pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def match(self, environ: WSGIEnvironment) -> bool:
        path = request_path(environ)
        if path is None or (path not in self.exact and not path.startswith(self.prefixes)):
            return False
        # Also as sent: an encoded "/" that dot segments removed ("/static/%2f/..")
        # is still there for an upstream that decodes before it resolves.
        raw = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or "").partition("?")[0]
        lowered = f"{path} {raw}".lower()
        return not any(s in lowered for s in self._SUSPICIOUS)

    def describe(self) -> list[str]:
        return sorted(self.exact) + [p + "*" for p in self.prefixes]


def string_list(values: Any, key: str) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(key, f"expected a list of non-empty strings, got {values!r}")
    return list(values)
