"""Stand-ins for the impersonation tests: a Kubernetes-like upstream and Access's get-identity.

:class:`ApiServerLike` reads each request off a raw socket and records its
header lines exactly as they arrived (a repeated name stays two lines), then
checks the impersonation headers the way the Kubernetes API server's
impersonation filter does: at most one ``Impersonate-User``, and
``Impersonate-Group``, ``Impersonate-Uid`` and ``Impersonate-Extra-*`` only
together with a user. A request that breaks those rules gets ``400``, as the
API server answers it.

:class:`AccessIdentity` serves ``/cdn-cgi/access/get-identity`` like Cloudflare
Access: it reads the ``CF_Authorization`` cookie, answers with the identity's
``email`` and ``groups`` (objects with ``id``, ``name``, ``email``), records
every request it gets, and can fail on demand.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import jwt

IDENTITY_PATH = "/cdn-cgi/access/get-identity"


@dataclass
class RawSeen:
    """One request as its bytes came: the request line and every header line, in order."""

    request_line: str
    lines: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.lines if k.lower() == name.lower()]

    def impersonation(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.lines if k.lower().startswith("impersonate")]


def impersonation_problem(lines: list[tuple[str, str]]) -> str | None:
    """What the API server's impersonation filter would refuse in *lines*, or None."""
    users = [v for k, v in lines if k.lower() == "impersonate-user"]
    others = [
        k
        for k, _ in lines
        if k.lower() in ("impersonate-group", "impersonate-uid")
        or k.lower().startswith("impersonate-extra-")
    ]
    if len(users) > 1:
        return "more than one Impersonate-User"
    if users and not users[0]:
        return "empty Impersonate-User"
    if others and not users:
        return f"{others[0]} without Impersonate-User"
    if any(k.lower() == "impersonate-extra-" for k, _ in lines):
        return "Impersonate-Extra- without a key"
    return None


def extras(lines: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The user's extra fields as the API server builds them: key lower-cased, then unescaped."""
    out: dict[str, list[str]] = {}
    for name, value in lines:
        if name.lower().startswith("impersonate-extra-"):
            key = unquote(name[len("impersonate-extra-") :].lower())
            out.setdefault(key, []).append(value)
    return out


class ApiServerLike:
    """A raw-socket HTTP/1.1 upstream on 127.0.0.1 that records header lines as they came."""

    def __init__(self) -> None:
        self.seen: list[RawSeen] = []
        self.refused: list[str] = []
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                owner._serve(self.rfile, self.wfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def last(self) -> RawSeen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]

    def _serve(self, rfile: Any, wfile: Any) -> None:
        while True:
            request_line = rfile.readline(65537)
            if not request_line.strip():
                return
            lines: list[tuple[str, str]] = []
            length = 0
            while True:
                raw = rfile.readline(65537)
                if raw in (b"\r\n", b"\n", b""):
                    break
                name, _, value = raw.decode("latin-1").rstrip("\r\n").partition(":")
                lines.append((name, value.strip()))
                if name.lower() == "content-length":
                    length = int(value)
            if length:
                rfile.read(length)
            seen = RawSeen(request_line.decode("latin-1").rstrip("\r\n"), lines)
            self.seen.append(seen)
            problem = impersonation_problem(lines)
            if problem is not None:
                self.refused.append(problem)
                body = json.dumps({"kind": "Status", "code": 400, "message": problem}).encode()
                status = b"400 Bad Request"
            else:
                users = seen.values("Impersonate-User")
                body = json.dumps(
                    {
                        "user": users[0] if users else None,
                        "groups": seen.values("Impersonate-Group"),
                        "extra": extras(lines),
                    }
                ).encode()
                status = b"200 OK"
            wfile.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wfile.flush()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class IdentityRequest:
    """One request the get-identity stand-in received."""

    path: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class AccessIdentity:
    """Cloudflare Access's get-identity on 127.0.0.1.

    ``groups`` maps an email to its group names. ``mode``: ``ok``; ``error``
    (500); ``garbage`` (200, not JSON); ``stall`` (never answers until set back
    to ``ok`` or stopped); ``other`` (answers about somebody else). ``delay``
    holds every answer that long, so that concurrent requests overlap. Every
    answer sets a cookie, which must never come back.
    """

    def __init__(self, groups: dict[str, list[str]] | None = None) -> None:
        self.groups = dict(groups or {})
        self.mode = "ok"
        self.delay = 0.0
        self.requests: list[IdentityRequest] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{IDENTITY_PATH}"

    @property
    def hits(self) -> int:
        return len(self.requests)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode != "stall":
            self._release.set()
            self._release = threading.Event()

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(IdentityRequest(request.path, list(request.headers.items())))
        if self.delay:
            time.sleep(self.delay)
        mode = self.mode
        if request.path != IDENTITY_PATH:
            self._send(request, 404, b"not found")
        elif mode == "stall":
            self._release.wait(60)
            request.close_connection = True
        elif mode == "error":
            self._send(request, 500, b"internal error")
        elif mode == "garbage":
            self._send(request, 200, b"<html>login</html>")
        else:
            email = self._email(request.headers.get("Cookie", ""))
            if email is None:
                self._send(request, 401, b"no token")
                return
            if mode == "other":
                email = "mallory@example.com"
            document = {
                "id": "1d41b4b4-0c5d-4b8e-9a3e-8f0a7c6b5d4e",
                "name": email.split("@")[0],
                "email": email,
                "groups": [
                    {"id": f"id-{name}", "name": name, "email": f"{name}@example.com"}
                    for name in self.groups.get(email, [])
                ],
                "idp": {"id": "okta", "type": "okta"},
            }
            self._send(request, 200, json.dumps(document).encode())

    @staticmethod
    def _email(cookie: str) -> str | None:
        name, _, token = cookie.partition("=")
        if name != "CF_Authorization" or ";" in token:
            return None
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        email = claims.get("email")
        return email if isinstance(email, str) else None

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        request.send_response(code)
        request.send_header("Content-Type", "application/json" if code == 200 else "text/plain")
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Set-Cookie", "CF_Session=from-the-last-answer; Path=/")
        request.end_headers()
        request.wfile.write(body)
