"""Fuzz the identity step: token extraction (header, ``Bearer`` prefix, cookie), JWT
verification, the policy and the identity headers, plus the key set parser.

The first byte picks what the rest is:

- ``0`` mod 4: a token as the client sends it, in the header (raw or after
  ``Bearer``) or in the ``CF_Authorization`` cookie (next byte decides);
- ``1``: the claims (JSON text) of a token signed with the trusted key, so the
  fuzzer reaches what happens *after* the signature check;
- ``2``: the protected header (JSON text) of such a token;
- ``3``: a key set document, as the key endpoint might return it.

Allowed outcomes: ``200``, ``401`` or ``403`` (a
:class:`~authproxy.middleware.identity.keys.KeyFetchError`
for a bad key set); on ``200`` every identity header is a latin-1 value without
CR, LF or NUL. Anything else, an exception included, is a crash. The keys come
from a real key server on 127.0.0.1 (:mod:`tests.jwks`).

    python -m fuzz.run jwt      # or: python -m fuzz.fuzz_jwt [libFuzzer flags] CORPUS
"""

from __future__ import annotations

import json
from typing import Any

import jwt
from jwt.api_jws import PyJWS

from authproxy.headers import has_ctl
from authproxy.middleware.identity import Identity
from authproxy.middleware.identity.keys import KeyFetchError, parse_key_set
from tests.jwks import AUDIENCE, ISSUER, TEAM_DOMAIN, JwksServer, SigningKey

HEADER_KEY = "HTTP_CF_ACCESS_JWT_ASSERTION"
IDENTITY_HEADERS = {
    "X-Auth-Request-Email": "email",
    "X-Auth-Request-User": "name",
    "X-Groups": "groups",
    "X-Custom": "custom",
}

_state: dict[str, Any] = {}


def _setup() -> tuple[Identity, SigningKey]:
    """One key server and one identity step per process, built on first use."""
    if not _state:
        key = SigningKey("EC")
        server = JwksServer([key]).start()
        identity = Identity(
            _upstream,
            team_domain=TEAM_DOMAIN,
            audience=[AUDIENCE],
            certs_url=server.url,
            algorithms=["ES256", "RS256"],
            identity_headers=IDENTITY_HEADERS,
            token_cache_size=0,
            keys_refresh_interval=3600,
            keys_min_refetch_interval=3600,
        )
        _state.update(identity=identity, key=key, server=server)
    return _state["identity"], _state["key"]


def _upstream(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b""]


def _run(identity: Identity, environ: dict[str, Any]) -> None:
    statuses: list[str] = []
    environ.setdefault("REQUEST_METHOD", "GET")
    environ.setdefault("PATH_INFO", "/")
    identity(environ, lambda status, headers, exc_info=None: statuses.append(status))
    status = statuses[0][:3]
    if status not in ("200", "401", "403"):
        raise AssertionError(f"status {statuses[0]}")
    if status == "200":
        for name in IDENTITY_HEADERS:
            key = "HTTP_" + name.upper().replace("-", "_")
            value = environ.get(key)
            if value is not None:
                if has_ctl(value):
                    raise AssertionError(f"{name} holds CR, LF or NUL: {value!r}")
                value.encode("latin-1")


def _signed(key: SigningKey, payload: bytes, header: dict[str, Any] | None = None) -> str:
    headers = {"kid": key.kid, **(header or {})}
    alg = headers.pop("alg", key.alg)
    return PyJWS().encode(payload, key.private, algorithm=alg, headers=headers)


def check(data: bytes) -> None:
    """One input; raises on a crash."""
    if not data:
        return
    identity, key = _setup()
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        where, text = (rest[:1] or b"\0")[0] % 3, rest[1:].decode("latin-1")
        if where == 0:
            environ = {HEADER_KEY: text}
        elif where == 1:
            environ = {HEADER_KEY: "Bearer " + text}
        else:
            environ = {"HTTP_COOKIE": "CF_Authorization=" + text}
        _run(identity, environ)
    elif mode == 1:
        _run(identity, {HEADER_KEY: _signed(key, rest)})
    elif mode == 2:
        try:
            header = json.loads(rest)
        except ValueError:
            return
        if not isinstance(header, dict):
            return
        header.pop("alg", None)  # signed with the key's own algorithm, as a forger could not
        try:
            token = _signed(key, json.dumps(_valid_claims()).encode(), header)
        except (TypeError, ValueError, jwt.PyJWTError):
            return  # PyJWT will not even write it
        _run(identity, {HEADER_KEY: token})
    else:
        try:
            parse_key_set(rest, ["ES256", "RS256"])
        except KeyFetchError:
            pass


def _valid_claims() -> dict[str, Any]:
    return {
        "aud": [AUDIENCE],
        "iss": ISSUER,
        "email": "alice@example.com",
        "sub": "7335d417",
        "iat": 1_700_000_000,
        "nbf": 1_700_000_000,
        "exp": 4_102_444_800,  # 2100: seeds stay valid
    }


def seeds() -> dict[str, bytes]:
    """Inputs to start from, one per mode (the claims seed is a token that passes)."""
    _identity, key = _setup()
    claims = json.dumps(_valid_claims()).encode()
    return {
        "header-token": b"\x00\x00" + _signed(key, claims).encode(),
        "cookie-token": b"\x00\x02" + _signed(key, claims).encode(),
        "claims": b"\x01" + claims,
        "jws-header": b"\x02" + json.dumps({"typ": "JWT", "kid": key.kid}).encode(),
        "key-set": b"\x03" + json.dumps({"keys": [key.jwk()]}).encode(),
    }
