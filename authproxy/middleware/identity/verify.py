"""Verifying an identity-aware proxy's signed assertion (a JWT) into a :class:`VerifiedIdentity`.

Verification is PyJWT's: the token's ``alg`` must be in the provider's
allow-list (asymmetric only: never ``none``, never HMAC) and equal to the
algorithm of the trusted key its ``kid`` names; the signature, ``aud``,
``iss``, ``exp``, ``iat`` (all four required) and ``nbf`` (when present) are
checked with a small leeway. A verified result is cached under the SHA-256 of
the token, never past the token's ``exp``.
"""

from __future__ import annotations

import hashlib
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from ...context import VerifiedIdentity
from .keys import KeyCache

REQUIRED_CLAIMS = ("exp", "iat", "aud", "iss")
__all__ = ["Refused", "TokenCache", "TokenVerifier", "refusal_reason"]
#: Longer than any real assertion; refused before any parsing.
MAX_TOKEN_LENGTH = 16 * 1024


class Refused(Exception):
    """The token is not acceptable; ``reason`` is for the log (never holds the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt_errors.ExpiredSignatureError, "token expired"),
    (jwt_errors.ImmatureSignatureError, "token not yet valid (nbf/iat in the future)"),
    (jwt_errors.InvalidAudienceError, "wrong audience"),
    (jwt_errors.InvalidIssuerError, "wrong issuer"),
    (jwt_errors.InvalidSignatureError, "bad signature"),
    (jwt_errors.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt_errors.InvalidKeyError, "key does not fit the token"),
    (jwt_errors.InvalidIssuedAtError, "bad iat claim"),
    (jwt_errors.DecodeError, "malformed token"),
)


def refusal_reason(exc: Exception) -> str:
    """A short, token-free reason for a PyJWT error."""
    if isinstance(exc, jwt_errors.MissingRequiredClaimError):
        return f"token lacks the {exc.claim!r} claim"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return f"invalid token ({type(exc).__name__})"


class TokenCache:
    """Verified identities by SHA-256 of the token, at most *size* of them.

    An entry is used only before the token's ``exp``, within *ttl* seconds of
    its verification, and while the key set has not lost a key since.
    """

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[VerifiedIdentity, float, int]] = OrderedDict()

    def get(self, digest: bytes, generation: int) -> VerifiedIdentity | None:
        if self.size <= 0:
            return None
        # A hit takes no lock: under a threaded server a lock taken per request
        # makes the threads queue up behind whichever of them the GIL
        # interrupted while holding it. Each OrderedDict call is atomic.
        entry = self._entries.get(digest)
        if entry is not None:
            identity, until, gen = entry
            if gen == generation and time.time() < until:
                try:
                    self._entries.move_to_end(digest)
                except KeyError:  # evicted meanwhile by another thread
                    pass
                self.hits += 1  # statistics: a lost increment does no harm
                return identity
        with self._lock:
            if entry is not None and self._entries.get(digest) is entry:
                del self._entries[digest]
            self.misses += 1
            return None

    def put(self, digest: bytes, identity: VerifiedIdentity, exp: float, generation: int) -> None:
        if self.size <= 0:
            return
        until = min(exp, time.time() + self.ttl)
        with self._lock:
            self._entries[digest] = (identity, until, generation)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class TokenVerifier:
    """Turns a token into a :class:`VerifiedIdentity`, or raises :class:`Refused`."""

    def __init__(
        self,
        keys: KeyCache,
        *,
        algorithms: Sequence[str],
        audience: Sequence[str],
        issuer: str,
        leeway: float,
        service_token_claim: str | None,
        cache_size: int,
        cache_ttl: float,
        groups_claim: str | None = "groups",
        strict_groups: bool = False,
    ) -> None:
        self.keys = keys
        self.groups_claim = groups_claim
        self.strict_groups = strict_groups
        self.algorithms = frozenset(algorithms)
        self.audience = list(audience)
        self.issuer = issuer
        self.leeway = leeway
        self.service_token_claim = service_token_claim
        self.cache = TokenCache(cache_size, cache_ttl)
        self._options: Any = {"require": list(REQUIRED_CLAIMS), "verify_signature": True}

    def verify(self, token: str) -> VerifiedIdentity:
        if len(token) > MAX_TOKEN_LENGTH:
            raise Refused("token too large")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        generation = self.keys.generation
        cached = self.cache.get(digest, generation)
        if cached is not None:
            return cached
        claims = self._decode(token)
        identity = self._identity(claims)
        self.cache.put(digest, identity, float(claims["exp"]), generation)
        return identity

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Refused("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        # Checked before the key lookup, so junk cannot trigger a refetch.
        if alg not in self.algorithms:
            raise Refused("algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise Refused("malformed token")
        key = self.keys.get(kid)
        if key is None:
            raise Refused("unknown key id" if self.keys.has_keys() else "no signing keys")
        if alg != key.algorithm_name:
            raise Refused("algorithm does not match the key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self._options,
            )
        except jwt.PyJWTError as exc:
            raise Refused(refusal_reason(exc)) from None
        except (ValueError, TypeError, OverflowError):
            raise Refused("malformed token") from None
        if not isinstance(claims.get("exp"), (int, float)):
            raise Refused("bad exp claim")
        return claims

    def _identity(self, claims: Mapping[str, Any]) -> VerifiedIdentity:
        email = claims.get("email")
        # An OIDC token may carry an address its IdP did not verify.
        if not isinstance(email, str) or not email or claims.get("email_verified") is False:
            email = None
        service_token = None
        if email is None and self.service_token_claim:
            name = claims.get(self.service_token_claim)
            if isinstance(name, str) and name:
                service_token = name
        subject = claims.get("sub")
        subject = subject if isinstance(subject, str) else ""
        if not (email or service_token or subject):
            raise Refused("token names nobody (no email, service token or sub)")
        return VerifiedIdentity(
            subject=subject,
            email=email,
            service_token=service_token,
            issuer=str(claims.get("iss")),
            claims=types.MappingProxyType(dict(claims)),
            groups=self._groups(claims),
        )

    def _groups(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        """The groups claim: absent -> none, a string -> one group, a list of strings.

        Anything else refuses the token when the claim was configured
        (``strict_groups``); the default ``groups`` claim then gives no groups.
        """
        if self.groups_claim is None:
            return ()
        value = claims.get(self.groups_claim)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(g, str) for g in value):
            return tuple(value)
        if not self.strict_groups:
            return ()
        raise Refused(f"claim {self.groups_claim!r} is not a list of group names")
