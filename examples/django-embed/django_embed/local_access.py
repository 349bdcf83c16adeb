"""A stand-in for Cloudflare Access on 127.0.0.1, to try the app without a Cloudflare
account: a signing key, its key set served at ``/cdn-cgi/access/certs``, and tokens
shaped like Access's (RS256, ``kid``, ``aud``, ``iss``, ``email``, ``exp``)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from werkzeug.serving import WSGIRequestHandler, make_server

TEAM_DOMAIN = "demo.cloudflareaccess.com"
AUDIENCE = "demo-audience-tag"
CERTS_PATH = "/cdn-cgi/access/certs"


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class LocalAccess:
    """``start()`` it, point ``certs_url`` at ``.certs_url``, sign tokens with ``.token()``."""

    def __init__(self) -> None:
        self.kid = uuid.uuid4().hex
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        self._document = json.dumps({"keys": [{**jwk, "kid": self.kid, "alg": "RS256"}]}).encode()
        self._server = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=QuietHandler
        )

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] != CERTS_PATH:
            start_response("404 Not Found", [("Content-Length", "0")])
            return []
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(self._document)))],
        )
        return [self._document]

    @property
    def certs_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{CERTS_PATH}"

    def token(self, email: str = "you@example.com", **claims: Any) -> str:
        now = int(time.time())
        body = {
            "aud": [AUDIENCE],
            "iss": f"https://{TEAM_DOMAIN}",
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, email)),
            "email": email,
            "type": "app",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            **claims,
        }
        return jwt.encode(body, self._key, algorithm="RS256", headers={"kid": self.kid})

    def start(self) -> LocalAccess:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
