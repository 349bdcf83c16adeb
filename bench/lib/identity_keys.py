"""Make a signing key, its key set in Cloudflare Access's format, and one token.

usage: identity_keys.py OUT_DIR TEAM_DOMAIN AUDIENCE

Writes, in OUT_DIR:

* ``certs.json``: what ``https://<team>/cdn-cgi/access/certs`` returns: ``keys``
  (a JWKS with kid/alg RS256), ``public_cert`` and ``public_certs`` (the same
  key as a self-signed X.509 certificate);
* ``token``: an RS256 Access assertion for AUDIENCE, issued by
  ``https://TEAM_DOMAIN``, valid for 24 hours;
* ``expired-token``: the same, expired (for a quick negative check).

The key is made fresh on every run and never written to disk: the benchmark
only needs what a proxy would see.
"""

from __future__ import annotations

import datetime
import json
import secrets
import sys
import time
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm


def self_signed_pem(key: rsa.RSAPrivateKey, team_domain: str) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, team_domain)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def claims(team_domain: str, audience: str, now: int, lifetime: int) -> dict[str, object]:
    """The claims of an Access application token for a logged-in user."""
    return {
        "aud": [audience],
        "email": "bench@example.com",
        "exp": now + lifetime,
        "iat": now,
        "nbf": now,
        "iss": f"https://{team_domain}",
        "type": "app",
        "identity_nonce": secrets.token_hex(8),
        "sub": "7335d417-61da-459d-899c-0a01c76a2f94",
        "country": "CH",
    }


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    out, team_domain, audience = Path(argv[1]), argv[2], argv[3]
    out.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = secrets.token_hex(16)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg="RS256", use="sig")
    cert = {"kid": kid, "cert": self_signed_pem(key, team_domain)}
    document = {"keys": [jwk], "public_cert": cert, "public_certs": [cert]}
    (out / "certs.json").write_text(json.dumps(document, indent=2) + "\n")

    now = int(time.time())
    headers = {"kid": kid}
    token = jwt.encode(claims(team_domain, audience, now, 86400), key, "RS256", headers)
    expired = jwt.encode(claims(team_domain, audience, now - 7200, 3600), key, "RS256", headers)
    (out / "token").write_text(token + "\n")
    (out / "expired-token").write_text(expired + "\n")
    # Prove the pair fits before anything is measured with it.
    jwt.decode(
        token,
        jwt.PyJWK(jwk).key,
        algorithms=["RS256"],
        audience=audience,
        issuer=f"https://{team_domain}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
