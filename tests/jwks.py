"""A real key endpoint for the identity tests: signing keys, tokens, and a JWKS server.

:class:`JwksServer` serves the key set in Cloudflare Access's exact certs
format (``keys``, ``public_cert``, ``public_certs``) on 127.0.0.1, counts the
requests it gets, and can rotate its keys or misbehave on demand (error
status, stall, garbage, an empty set). Tokens are signed with PyJWT by
:class:`SigningKey`; forged ones (``alg: none``, HS256 keyed with the public
key, a tampered payload) are built here by hand, as an attacker would.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.utils import base64url_decode, base64url_encode

TEAM_DOMAIN = "authproxy-test.cloudflareaccess.com"
ISSUER = f"https://{TEAM_DOMAIN}"
AUDIENCE = "4714c1358e65fe4b408ad6d432a5f878f08194bdb4752441fd56faefa9b2b6f2"
CERTS_PATH = "/cdn-cgi/access/certs"

#: Leave a claim out of :func:`claims`.
DROP: Any = object()


class SigningKey:
    """A real RSA-2048 (RS256) or P-256 (ES256) key pair with a kid."""

    def __init__(self, kind: str = "RSA", kid: str | None = None) -> None:
        self.kind = kind
        self.kid = kid or secrets.token_hex(16)
        if kind == "RSA":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
        elif kind == "EC":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
        else:
            raise ValueError(kind)
        self.public = self.private.public_key()
        self._cert: str | None = None

    def jwk(self) -> dict[str, Any]:
        """The public key as Cloudflare lists it: kid, kty, alg, use and the numbers."""
        algorithm = RSAAlgorithm if self.kind == "RSA" else ECAlgorithm
        numbers = algorithm.to_jwk(self.public, as_dict=True)
        numbers.pop("key_ops", None)
        return {"kid": self.kid, "alg": self.alg, "use": "sig", **numbers}

    def public_pem(self) -> bytes:
        return bytes(
            self.public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def cert_pem(self) -> str:
        """A self-signed certificate for the key, like Cloudflare's ``public_certs``."""
        if self._cert is None:
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TEAM_DOMAIN)])
            now = datetime.datetime.now(datetime.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self.public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=60))
                .sign(self.private, hashes.SHA256())
            )
            self._cert = cert.public_bytes(serialization.Encoding.PEM).decode()
        return self._cert

    def sign(self, payload: dict[str, Any], **header: Any) -> str:
        """A JWT signed by PyJWT with this key; *header* adds to (or replaces) kid/alg."""
        headers = {"kid": self.kid, **header}
        alg = headers.pop("alg", self.alg)
        return jwt.encode(payload, self.private, algorithm=alg, headers=headers)


def claims(**overrides: Any) -> dict[str, Any]:
    """The claims of a Cloudflare Access app token for alice, valid for 10 minutes."""
    now = int(time.time())
    base: dict[str, Any] = {
        "aud": [AUDIENCE],
        "email": "alice@example.com",
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "type": "app",
        "identity_nonce": "6ei69kawdKzMIAPF",
        "sub": "7335d417-61da-459d-899c-0a01c76a2f94",
        "country": "US",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


def service_claims(common_name: str, **overrides: Any) -> dict[str, Any]:
    """A Cloudflare service token's claims: ``common_name``, empty ``sub``, no email."""
    return claims(email=DROP, sub="", common_name=common_name, **overrides)


def _segment(data: dict[str, Any]) -> str:
    return base64url_encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def unsigned(payload: dict[str, Any], kid: str) -> str:
    """``alg: none``: no signature at all."""
    return f"{_segment({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{_segment(payload)}."


def hs256_with(secret: bytes, payload: dict[str, Any], kid: str) -> str:
    """HS256 keyed with *secret* (e.g. the public key's PEM): the algorithm-confusion attack."""
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_segment(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64url_encode(mac).decode()}"


def tampered(token: str, **changes: Any) -> str:
    """The same header and signature over a changed payload."""
    header, payload, signature = token.split(".")
    data = json.loads(base64url_decode(payload))
    data.update(changes)
    return f"{header}.{_segment(data)}.{signature}"


def certs_document(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """Cloudflare Access's certs document for *keys* (the first is the current one)."""
    keys = list(keys)
    document: dict[str, Any] = {
        "keys": [k.jwk() for k in keys],
        "public_certs": [{"kid": k.kid, "cert": k.cert_pem()} for k in keys],
    }
    if keys:
        document["public_cert"] = document["public_certs"][0]
    return document


class JwksServer:
    """A key endpoint on 127.0.0.1 that can rotate keys and misbehave.

    ``mode``: ``ok``; ``error`` (503); ``stall`` (accepts, never answers until
    stopped or set back to ``ok``); ``garbage`` (200, not JSON); ``empty``
    (200, a valid document with no key); ``not-found`` (404).
    ``hits`` counts requests to the certs path. *port* 0 picks a free one;
    *sock*, a socket bound but not yet listening, is listened on instead (a
    port held, refusing connections, until the endpoint comes up).
    """

    MODES = ("ok", "error", "stall", "garbage", "empty", "not-found")

    def __init__(
        self,
        keys: Iterable[SigningKey] = (),
        mode: str = "ok",
        port: int = 0,
        sock: socket.socket | None = None,
    ) -> None:
        self.keys = list(keys)
        self.mode = mode
        self.hits = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        if sock is None:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        else:
            self._httpd = ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
            self._httpd.socket = sock
            self._httpd.server_activate()
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CERTS_PATH}"

    def start(self) -> JwksServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> JwksServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def set_mode(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(mode)
        self.mode = mode
        if mode != "stall":
            self._release.set()
            self._release = threading.Event()

    def rotate(self, *keys: SigningKey) -> None:
        """Publish exactly *keys* from now on."""
        self.keys = list(keys)

    def wait_for_hits(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.hits < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the key endpoint got {self.hits} requests, not {count}")
            time.sleep(0.02)

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        if request.path.partition("?")[0] != CERTS_PATH:
            self._send(request, 404, b"not found")
            return
        with self._lock:
            self.hits += 1
        mode = self.mode
        if mode == "stall":
            self._release.wait(60)
            request.close_connection = True
            return
        if mode == "error":
            self._send(request, 503, b"upstream connect error")
        elif mode == "not-found":
            self._send(request, 404, b"not found")
        elif mode == "garbage":
            self._send(request, 200, b"<html>this is not a key set</html>")
        elif mode == "empty":
            self._send(request, 200, json.dumps(certs_document([])).encode())
        else:
            self._send(request, 200, json.dumps(certs_document(self.keys)).encode())

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        request.send_response(code)
        request.send_header("Content-Type", "application/json" if code == 200 else "text/plain")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
