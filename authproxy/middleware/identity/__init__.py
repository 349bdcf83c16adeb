"""Verify the identity-aware proxy's signed assertion on every request, apply the
allow policy, and hand the identity to the steps inside and to the upstream."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ...context import IDENTITY, refuse, request_path
from ...errors import ConfigError
from ...headers import environ_key, sanitize
from ..templates import identity_value
from .groups import AccessGroups, GroupsUnavailable
from .keys import KeyCache
from .policy import Policy, SkipPaths
from .providers import check_header_name, cookie_copies, keep_one_cookie, resolve
from .verify import Refused, TokenVerifier

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

DEFAULT_IDENTITY_HEADERS: Mapping[str, str] = {
    "X-Auth-Request-Email": "email",
    "X-Auth-Request-User": "name",
}
#: Always removed from client requests: nobody but this step asserts who the user is.
ALWAYS_REMOVED = ("Cf-Access-Authenticated-User-Email", *DEFAULT_IDENTITY_HEADERS)
_VALUE_CTL = frozenset(chr(c) for c in range(32) if c != 9) | {"\x7f"}


class Identity:
    """Let a request through only with a valid assertion from the identity-aware proxy.

    No token: ``401``. Tokens that differ (the header and the cookie, or two
    copies of the cookie): ``401``, whatever each is worth. A token that is
    malformed, expired, not yet valid, for another audience or issuer, signed
    with a disallowed algorithm or by an unknown key, or whose identity the
    policy does not allow: ``403``. The client sees only the status phrase;
    the reason goes to the access log. With no trusted key (the key endpoint
    was never reachable) every request is refused; health endpoints, outside
    this step, keep answering.

    On success ``environ["authproxy.identity"]`` holds a
    :class:`~authproxy.context.VerifiedIdentity` and the identity headers are
    set for the upstream. The upstream gets the token only as verified: the
    ``Cookie`` header keeps one copy of the token's cookie (identical copies
    are dropped), every other cookie byte for byte. Client-supplied copies of
    the identity headers, of the defaults and of
    ``Cf-Access-Authenticated-User-Email`` are always removed.
    A header value that would hold a control character (CR, LF, NUL...) is
    never set: the request is refused with ``403``; so is an identity whose
    name (email, service token or subject) holds one, with any
    ``identity_headers`` (also ``{}``).

    :param provider: ``cloudflare-access`` (default), ``google-iap``, ``pomerium``
        or ``oidc`` (set ``header``/``cookie``, ``certs_url``, ``issuer`` yourself).
    :param team_domain: ``myteam.cloudflareaccess.com``; for ``pomerium`` the route's host.
    :param audience: the audience tag (or several); the token's ``aud`` must hold one.
    :param certs_url: where the keys are published; overrides the preset's URL.
        ``https://`` (``http://`` only for loopback addresses).
    :param issuer: the expected ``iss``; overrides the preset's.
    :param header: the header carrying the token; overrides the preset's. A
        ``Bearer`` prefix is ignored (for ``header = "Authorization"``).
    :param cookie: the cookie carrying the token (the browser's copy; the header
        is the edge's): True for the preset's (``CF_Authorization``), False for
        none, or a name (matched case-insensitively).
    :param algorithms: accepted signature algorithms (asymmetric only); overrides the preset's.
    :param leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    :param allow_emails: addresses allowed (case-insensitive).
    :param allow_email_domains: domains whose addresses are allowed (exact, no subdomains).
    :param allow_service_tokens: service tokens allowed, by name (Cloudflare's ``common_name``).
    :param allow_claims: claim -> accepted values; a claim holding a list matches
        if any item is accepted. All ``allow_*`` lists empty: any verified identity
        passes; otherwise an identity passes when any one rule matches it.
    :param allow_groups: groups allowed (any one suffices; exact, case-sensitive).
    :param groups: where the person's groups come from, for ``allow_groups``,
        ``${identity:groups}`` and the ``impersonate`` step: ``"access"``
        (cloudflare-access only: asked of Access's ``get-identity`` endpoint with
        the verified token, once per token; when that fails the request gets
        ``503``, never "no groups"; service tokens have none) or
        ``"claim:<name>"`` (a claim of the token: a list of strings, or one
        string; absent: none; anything else: ``403``). Default: the token's
        ``groups`` claim when it holds names, else none (Access app tokens carry
        none: ``allow_groups`` with ``cloudflare-access`` needs ``"access"``).
    :param identity_url: the ``get-identity`` endpoint; overrides the one derived
        from ``team_domain``. ``https://`` (``http://`` only for loopback addresses).
    :param groups_timeout: seconds one ``get-identity`` call may take.
    :param groups_cache_size: tokens whose groups are remembered (until the token's ``exp``).
    :param identity_headers: upstream header -> ``email``, ``name`` (email, else
        service token, else subject), ``subject``, ``service_token``, ``issuer``
        or any claim. ``{}`` sets none. Default: ``X-Auth-Request-Email`` and
        ``X-Auth-Request-User``.
    :param skip_paths: paths that need no identity (``/favicon.ico``, or
        ``/static/*`` for a prefix), matched on the forwarded target with dot
        segments resolved (``..;`` and ``%2e%2e`` count as ``..``, see
        :func:`~authproxy.context.request_path`). A path with ``//``, a
        backslash or an encoded ``/``, ``\\``, ``%`` or NUL never matches; one
        that climbs above the root is refused with ``400``. Later steps still
        run: a skipped path also gets what they inject.
    :param keys_refresh_interval: seconds between scheduled key refetches.
    :param keys_min_refetch_interval: at least this long between refetches
        triggered by an unknown ``kid`` or by having no keys.
    :param keys_timeout: seconds one key fetch may take.
    :param keys_ca_bundle: CA bundle for the key endpoint's (and ``get-identity``'s)
        TLS, instead of the system's.
    :param token_cache_size: verified tokens kept (0: verify every request).
    :param token_cache_ttl: longest a verified token is trusted without a new
        signature check (never past its ``exp``).

    Example::

        app = Identity(app, provider="cloudflare-access",
                       team_domain="myteam.cloudflareaccess.com", audience="<AUD tag>",
                       allow_email_domains=["example.com"])
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        provider: str = "cloudflare-access",
        team_domain: str | None = None,
        audience: str | list[str],
        certs_url: str | None = None,
        issuer: str | None = None,
        header: str | None = None,
        cookie: str | bool = True,
        algorithms: list[str] | None = None,
        leeway: float = 10.0,
        allow_emails: list[str] | None = None,
        allow_email_domains: list[str] | None = None,
        allow_service_tokens: list[str] | None = None,
        allow_claims: dict[str, str | list[str]] | None = None,
        allow_groups: list[str] | None = None,
        groups: str | None = None,
        identity_url: str | None = None,
        groups_timeout: float = 5.0,
        groups_cache_size: int = 4096,
        identity_headers: dict[str, str] | None = None,
        skip_paths: list[str] | None = None,
        keys_refresh_interval: float = 3600.0,
        keys_min_refetch_interval: float = 30.0,
        keys_timeout: float = 5.0,
        keys_ca_bundle: str | None = None,
        token_cache_size: int = 4096,
        token_cache_ttl: float = 300.0,
    ) -> None:
        settings = resolve(
            provider,
            team_domain=team_domain,
            audience=audience,
            certs_url=certs_url,
            issuer=issuer,
            header=header,
            cookie=cookie,
            algorithms=algorithms,
            groups=groups,
            identity_url=identity_url,
        )
        if keys_ca_bundle is not None and not (isinstance(keys_ca_bundle, str) and keys_ca_bundle):
            raise ConfigError("keys_ca_bundle", f"expected a path, got {keys_ca_bundle!r}")
        self.settings = settings
        self.provider = provider
        self.audience = settings.audience
        self.header = settings.header
        self.cookie = settings.cookie
        self.certs_url = settings.certs_url
        self.issuer = settings.issuer
        self.algorithms = settings.algorithms
        for key, number in (
            ("leeway", leeway),
            ("keys_refresh_interval", keys_refresh_interval),
            ("keys_min_refetch_interval", keys_min_refetch_interval),
            ("keys_timeout", keys_timeout),
            ("token_cache_size", token_cache_size),
            ("token_cache_ttl", token_cache_ttl),
            ("groups_timeout", groups_timeout),
            ("groups_cache_size", groups_cache_size),
        ):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
                raise ConfigError(key, f"expected a number >= 0, got {number!r}")
        for key, number in (
            ("keys_timeout", keys_timeout),
            ("keys_refresh_interval", keys_refresh_interval),
            ("groups_timeout", groups_timeout),
        ):
            if number <= 0:
                raise ConfigError(key, f"expected a number > 0, got {number!r}")
        self.policy = Policy(
            emails=allow_emails,
            domains=allow_email_domains,
            service_tokens=allow_service_tokens,
            claims=allow_claims,
            groups=allow_groups,
        )
        if self.policy.groups and settings.groups is None and provider == "cloudflare-access":
            raise ConfigError(
                "allow_groups", 'Access tokens carry no groups: set groups = "access"'
            )
        self.groups = settings.groups
        self.identity_headers = _identity_headers(identity_headers)
        self._remove_keys = tuple(
            {environ_key(n) for n in (*ALWAYS_REMOVED, *(h for h, _, _ in self.identity_headers))}
        )
        self.skip_paths = SkipPaths(skip_paths)
        self._header_key = environ_key(self.header) if self.header else None
        self.app = app
        self.access_groups = (
            AccessGroups(
                settings.identity_url,
                timeout=groups_timeout,
                cache_size=groups_cache_size,
                ca_bundle=keys_ca_bundle,
            )
            if settings.identity_url is not None
            else None
        )
        # Last, so that a config error does not leave a thread behind.
        self.keys = KeyCache(
            self.certs_url,
            algorithms=self.algorithms,
            refresh_interval=keys_refresh_interval,
            min_refetch_interval=keys_min_refetch_interval,
            timeout=keys_timeout,
            ca_bundle=keys_ca_bundle,
        )
        self.verifier = TokenVerifier(
            self.keys,
            algorithms=self.algorithms,
            audience=self.audience,
            issuer=self.issuer,
            leeway=leeway,
            service_token_claim=settings.service_token_claim,
            cache_size=token_cache_size,
            cache_ttl=token_cache_ttl,
            # Unset, the token's "groups" claim, if it holds names (Access's has none).
            groups_claim=settings.groups_claim if settings.groups else "groups",
            strict_groups=settings.groups is not None,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sanitize(environ)
        for key in self._remove_keys:
            environ.pop(key, None)
        if request_path(environ) is None:
            # No path every upstream would resolve alike: decide nothing on it.
            return refuse(environ, start_response, 400, "bad path: above the root or not a path")
        if self.skip_paths and self.skip_paths.match(environ):
            return self.app(environ, start_response)
        token, conflict = self._token(environ)
        if conflict is not None:
            return refuse(environ, start_response, 401, f"conflicting access tokens: {conflict}")
        if not token:
            return refuse(environ, start_response, 401, "no identity token")
        try:
            identity = self.verifier.verify(token)
        except Refused as exc:
            return refuse(environ, start_response, 403, exc.reason)
        # A service token is nobody to Access's get-identity: it has no groups.
        if self.access_groups is not None and identity.email is not None:
            try:
                identity = self.access_groups.apply(token, identity)
            except GroupsUnavailable as exc:
                return refuse(environ, start_response, 503, f"groups unavailable: {exc.reason}")
        values = []
        for _name, key, field in self.identity_headers:
            value = identity_value(identity, field)
            if value is None:
                continue
            if not _VALUE_CTL.isdisjoint(value):
                return refuse(
                    environ, start_response, 403, f"claim {field!r} holds a control character"
                )
            values.append((key, value))
        # The name goes to the access log and to steps inside, whatever
        # identity_headers says (also with none).
        if not _VALUE_CTL.isdisjoint(identity.name):
            return refuse(environ, start_response, 403, "claim 'name' holds a control character")
        if not self.policy.allows(identity):
            return refuse(
                environ, start_response, 403, f"not allowed by policy: {_printable(identity.name)}"
            )
        for key, value in values:
            # WSGI carries header bytes as latin-1 text: send the claim as UTF-8
            # (a lone surrogate from a JSON "\ud800" as its own three bytes).
            environ[key] = value.encode("utf-8", "surrogatepass").decode("latin-1")
        if self.cookie is not None and "HTTP_COOKIE" in environ:
            # The upstream gets the token once, as verified: identical copies go.
            environ["HTTP_COOKIE"] = keep_one_cookie(environ["HTTP_COOKIE"], self.cookie, token)
        environ[IDENTITY] = identity
        return self.app(environ, start_response)

    def _token(self, environ: WSGIEnvironment) -> tuple[str | None, str | None]:
        """The one token the request carries, and why it is refused if it carries
        several that differ: (token, None) or (None, conflict)."""
        found: list[str] = []
        if self._header_key is not None:
            token = str(environ.get(self._header_key) or "").strip()
            # An OIDC setup may read the token from Authorization.
            if token[:7].lower() == "bearer ":
                token = token[7:].strip()
            if token:
                found.append(token)
        if self.cookie is not None and "HTTP_COOKIE" in environ:
            copies = cookie_copies(environ["HTTP_COOKIE"], self.cookie)
            if copies.ambiguous:
                return None, f"a {self.cookie} cookie after a comma"
            cookies = {v for v in copies.values if v}
            if len(cookies) > 1:
                return None, f"{len(cookies)} different {self.cookie} cookies"
            if found and cookies and cookies != {found[0]}:
                return None, f"the {self.header} header and the {self.cookie} cookie differ"
            found.extend(cookies)
        return (found[0] if found else None), None

    def has_keys(self) -> bool:
        """True when a signing key is trusted; a readiness check for ``/readyz``."""
        return self.keys.has_keys()

    def check_ready(self) -> bool:
        """The same, under the name the pipeline's readiness checks use."""
        return self.keys.has_keys()

    def describe(self) -> dict[str, Any]:
        """The resolved settings, for ``check-config``."""
        return {
            "provider": self.provider,
            "header": self.header,
            "cookie": self.cookie,
            "certs_url": self.certs_url,
            "issuer": self.issuer,
            "audience": self.audience,
            "algorithms": list(self.algorithms),
            "groups": (
                self.access_groups.describe()
                if self.access_groups is not None
                else self.groups or "claim:groups (if it holds names)"
            ),
            "policy": self.policy.describe(),
            "identity_headers": {h: f for h, _, f in self.identity_headers},
            "skip_paths": self.skip_paths.describe(),
            "keys": self.keys.kids() or "NONE (every request is refused)",
        }

    def close(self) -> None:
        self.keys.close()
        if self.access_groups is not None:
            self.access_groups.close()


def _printable(text: str) -> str:
    """*text* with control characters escaped, for a log line."""
    if _VALUE_CTL.isdisjoint(text):
        return text
    return "".join(repr(c)[1:-1] if c in _VALUE_CTL else c for c in text)


def _identity_headers(table: Any) -> tuple[tuple[str, str, str], ...]:
    table = DEFAULT_IDENTITY_HEADERS if table is None else table
    if not isinstance(table, Mapping):
        raise ConfigError("identity_headers", f"expected a table of header = field, got {table!r}")
    out = []
    for name, field in table.items():
        check_header_name(name, f"identity_headers.{name}")
        if not isinstance(field, str) or not field:
            raise ConfigError(f"identity_headers.{name}", f"expected a field name, got {field!r}")
        out.append((name, environ_key(name), field))
    return tuple(out)
