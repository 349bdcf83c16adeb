"""Real servers for the behaviour tests: a recording upstream and authproxy under gunicorn.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wsgi import get_input_stream

#: The credential every proxy in the suite injects; it must never show up
#: anywhere but in the upstream's recorded requests.
TOKEN = "sekrit-token-5f1c0e3a9b7d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll *predicate* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what or predicate}")
        time.sleep(0.05)


@dataclass
class RawResponse:
    """A response read off a raw socket with :mod:`http.client`'s parser."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def raw_request(port: int, data: bytes, method: str = "GET", timeout: float = 30.0) -> RawResponse:
    """Send *data* byte for byte (the request line and headers as given) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
        return RawResponse(response.status, response.getheaders(), body)


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body_sha256: str
    body_len: int
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass

    def make_environ(self) -> Any:
        environ = super().make_environ()
        # http.server collapses a leading "//" in self.path; the request line is the truth.
        environ["test.raw_target"] = self.raw_requestline.split(b" ")[1].decode("latin-1")
        return environ


@dataclass
class Upstream:
    """A real HTTP/1.1 server that records every request and answers by path.

    Paths: ``/status/N``, ``/bytes/N`` (N bytes streamed, chunked unless
    ``?cl=1``), ``/cookies`` (two Set-Cookie), ``/gzip``, ``/redirect``,
    ``/sleep/SECONDS``, ``/truncate`` (promises more than it sends),
    ``/sse`` (three events, 0.5 s apart), ``/hop`` (hop-by-hop response headers),
    ``/endless`` (streams until the reader goes away, then records it in
    ``disconnected``), ``/gzip-big`` (a large gzip body, chunked),
    ``/truncate-chunked`` (dies mid chunked body), ``/truncate-small`` (promises
    10000 bytes, sends 100), ``/set-cookie`` (one cookie, ``?name=value``),
    anything else: 200 ``ok``.

    With *ssl_context* it serves HTTPS (``url`` says so).
    """

    server: Any = None
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]

    def app(self, environ: dict[str, Any], start_response: Any) -> Any:
        stream = get_input_stream(environ)
        digest, total = hashlib.sha256(), 0
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        headers = [
            (k[5:].replace("_", "-").title(), v)
            for k, v in environ.items()
            if k.startswith("HTTP_")
        ]
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers.append((key.replace("_", "-").title(), environ[key]))
        target = environ.get("test.raw_target") or environ["PATH_INFO"]
        self.seen.append(
            Seen(environ["REQUEST_METHOD"], target, headers, digest.hexdigest(), total)
        )
        path = environ["PATH_INFO"]
        query = environ.get("QUERY_STRING", "")
        return self._answer(path, query, start_response)

    def _answer(self, path: str, query: str, start_response: Any) -> Any:
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            start_response(f"{code} X", [("Content-Length", "2")] if code not in (204, 304) else [])
            return [b"st"] if code not in (204, 304) else []
        if path.startswith("/bytes/"):
            n = int(path.split("/")[2])
            headers = [("Content-Type", "application/octet-stream")]
            if "cl=1" in query:
                headers.append(("Content-Length", str(n)))
            start_response("200 OK", headers)
            return _pattern(n)
        if path == "/cookies":
            start_response(
                "200 OK",
                [
                    ("Set-Cookie", "a=1; Path=/"),
                    ("Set-Cookie", "b=2, c=3"),
                    ("Content-Length", "2"),
                ],
            )
            return [b"ok"]
        if path == "/gzip":
            data = gzip.compress(b"hello " * 1000)
            start_response(
                "200 OK", [("Content-Encoding", "gzip"), ("Content-Length", str(len(data)))]
            )
            return [data]
        if path == "/redirect":
            start_response("302 Found", [("Location", "/elsewhere"), ("Content-Length", "9")])
            return [b"go away\r\n"]
        if path.startswith("/sleep/"):
            time.sleep(float(path.split("/")[2]))
            start_response("200 OK", [("Content-Length", "5")])
            return [b"slept"]
        if path == "/truncate":
            start_response("200 OK", [("Content-Length", "1000000")])
            return _truncated()
        if path == "/sse":
            start_response(
                "200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
            )
            return _events()
        if path == "/endless":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return self._endless()
        if path == "/gzip-big":
            start_response(
                "200 OK",
                [("Content-Encoding", "gzip"), ("Content-Type", "application/octet-stream")],
            )
            data = gzip_big()
            return [data[i : i + 50_000] for i in range(0, len(data), 50_000)]
        if path == "/truncate-chunked":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return _truncated(200_000)
        if path == "/truncate-small":
            start_response("200 OK", [("Content-Length", "10000")])
            return _truncated(100)
        if path == "/set-cookie":
            start_response(
                "200 OK",
                [("Set-Cookie", f"{query or 'session=abc'}; Path=/"), ("Content-Length", "2")],
            )
            return [b"ok"]
        if path == "/hop":
            start_response(
                "200 OK",
                [
                    ("Connection", "X-Secret-Hop"),
                    ("X-Secret-Hop", "1"),
                    ("Keep-Alive", "timeout=5"),
                    ("Content-Length", "2"),
                ],
            )
            return [b"ok"]
        body = b"ok"
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    def _endless(self) -> Iterator[bytes]:
        block = b"e" * 65536
        try:
            for _ in range(1 << 16):  # 4 GiB at most: bounded even if nobody hangs up
                yield block
        except GeneratorExit:
            self.disconnected.set()
            raise

    def start(self) -> Upstream:
        self.server = make_server(
            "127.0.0.1",
            0,
            self.app,
            threaded=True,
            request_handler=_QuietHandler,
            ssl_context=self.ssl_context,
        )
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _KeepAliveHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps connections open, unlike werkzeug's dev server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        owner: KeepAliveUpstream = self.server.owner  # type: ignore[attr-defined]
        owner.seen.append((self.path, self.client_address[1]))
        if self.path == "/endless":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            block = b"k" * 65536
            try:
                for _ in range(1 << 16):  # 4 GiB at most
                    self.wfile.write(block)
            except OSError:
                owner.disconnected.set()
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class KeepAliveUpstream:
    """A plain HTTP/1.1 upstream that keeps connections alive (as real apps do).

    ``seen`` holds (path, client port) per request, so connection reuse shows;
    ``/endless`` sends a body with a huge Content-Length until the reader
    goes away, then sets ``disconnected``; anything else is 200 ``ok``.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.disconnected = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveHandler)
        self.server.daemon_threads = True
        self.server.owner = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def one_answer_upstream(answer: bytes) -> tuple[socket.socket, threading.Thread]:
    """A listener that reads one request and sends *answer* byte for byte, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    return listener, thread


def _pattern(n: int) -> Iterator[bytes]:
    block = bytes(range(256)) * 256  # 64 KiB
    while n > 0:
        piece = block[: min(n, len(block))]
        n -= len(piece)
        yield piece


def _truncated(sent: int = 1000) -> Iterator[bytes]:
    yield b"x" * sent
    raise ConnectionAbortedError("upstream dies mid-body")


_GZIP_BIG: list[bytes] = []


def gzip_big() -> bytes:
    """About 1.5 MiB of gzip (well over the forwarder's small-body limit), made once."""
    if not _GZIP_BIG:
        text = b"".join(b"line %d of a compressible body\n" % i for i in range(200_000))
        _GZIP_BIG.append(gzip.compress(text, compresslevel=1, mtime=0))
    return _GZIP_BIG[0]


def _events() -> Iterator[bytes]:
    for i in range(3):
        yield f"data: event {i}\n\n".encode()
        time.sleep(0.5)


def sha256_of_pattern(n: int) -> str:
    digest = hashlib.sha256()
    for piece in _pattern(n):
        digest.update(piece)
    return digest.hexdigest()


def toml_value(value: Any) -> str:
    """Enough TOML for test configs: strings, numbers, bools, lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_toml(path: Path, config: dict[str, Any]) -> Path:
    lines = []
    for section, table in config.items():
        if section == "pipeline":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for step in config.get("pipeline", []):
        lines.append("[[pipeline]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in step.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Pki:
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate,
    plus an unrelated CA; every file is PEM in *directory*."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca)
        return context

    def self_signed_context(self) -> ssl.SSLContext:
        """The CA's own certificate served as a server's: self-signed, trusted by nobody."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca, self.ca_key)
        return context


def make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(
        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca("authproxy test CA")
    _other_key, other_cert = make_ca("some other CA")
    server_key, server_cert = leaf(ca_key, ca_cert, "127.0.0.1", server=True)
    client_key, client_cert = leaf(ca_key, ca_cert, "authproxy client", server=False)
    return Pki(
        directory=directory,
        ca=write_cert(ca_cert, directory / "ca.pem"),
        ca_key=write_key(ca_key, directory / "ca.key"),
        server_cert=write_cert(server_cert, directory / "server.pem"),
        server_key=write_key(server_key, directory / "server.key"),
        client_cert=write_cert(client_cert, directory / "client.pem"),
        client_key=write_key(client_key, directory / "client.key"),
        other_ca=write_cert(other_cert, directory / "other-ca.pem"),
    )


class Proxy:
    """``authproxy serve`` in a subprocess (real gunicorn), its stderr kept.

    *via* says how the config file reaches it: ``"flag"`` (``--config``),
    ``"env"`` (``AUTHPROXY_CONFIG``) or ``"gunicorn"`` (``gunicorn
    'authproxy.wsgi:application'`` with ``AUTHPROXY_CONFIG``).
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        workers: int = 1,
        threads: int = 8,
        via: str = "flag",
    ) -> None:
        # Workers the master should fork (the env-configured seed mode runs the default 2).
        self.expected_workers = workers if config is not None or via == "gunicorn" else 2
        if config is not None and "workers" in config.get("server", {}):
            self.expected_workers = config["server"]["workers"]
        self.dir = Path(tempfile.mkdtemp(prefix="authproxy-test-"))
        self.log_path = self.dir / "stderr.log"
        # A free port can be taken again before the proxy binds it (by another
        # server, or as a connection's local port): then start on another.
        for attempt in range(3):
            self.port = free_port()
            try:
                self._start(config, env, workers, threads, via)
                return
            except RuntimeError:
                if attempt == 2 or "Connection in use" not in self.logs():
                    raise

    def _start(
        self,
        config: dict[str, Any] | None,
        env: dict[str, str] | None,
        workers: int,
        threads: int,
        via: str,
    ) -> None:
        args = [sys.executable, "-m", "authproxy.cli", "serve"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY")}
        full_env.update(env or {})
        if via == "gunicorn":
            args = [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "authproxy.wsgi:application",
            ]
        if config is not None:
            config = dict(config)
            server = dict(config.get("server", {}))
            server.setdefault("listen", f"127.0.0.1:{self.port}")
            server.setdefault("workers", workers)
            server.setdefault("threads", threads)
            config["server"] = server
            path = str(write_toml(self.dir / "authproxy.toml", config))
            if via == "flag":
                args += ["--config", path]
            else:
                full_env["AUTHPROXY_CONFIG"] = path
        else:
            full_env["LISTEN_ADDRESS"] = f"127.0.0.1:{self.port}"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"authproxy exited {self.process.returncode}:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
                continue
            # The master listens before it forks: wait for the workers too. (If
            # another server took the port, that one answered; the master exits.)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"authproxy exited {self.process.returncode}:\n{self.logs()}"
                    )
                if len(self.worker_pids()) >= self.expected_workers:
                    return
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
        raise TimeoutError(f"authproxy did not start:\n{self.logs()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(
        self,
        until: str | Callable[[str], Any] | None = None,
        timeout: float = 30.0,
        what: str | None = None,
    ) -> str:
        """The proxy's output so far; with *until* (a text, or a predicate on the
        output), once that holds, failing after *timeout* seconds (the failure
        names *what* was awaited).

        Access lines are written in batches, at most a tenth of a second late
        (authproxy.serve.logs.BatchingStreamHandler), and some lines come from
        background threads: wait for what the test expects, not for a while.
        Once the proxy has stopped, everything is written.
        """
        holds = (lambda text: until in text) if isinstance(until, str) else until
        deadline = time.monotonic() + timeout
        while True:
            stopped = self.process.poll() is not None
            if not self._log.closed:
                self._log.flush()
            text = self.log_path.read_text(errors="replace")
            if holds is None or holds(text):
                return text
            if stopped or time.monotonic() > deadline:
                awaited = what or repr(until)
                raise AssertionError(f"the log never showed {awaited}:\n{text[-3000:]}")
            time.sleep(0.02)

    def access_lines(self, count: int = 0, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The access lines (JSON format) written so far, once there are at least *count*."""

        def enough(lines: list[dict[str, Any]]) -> bool:
            return len(lines) >= count

        return _wait_for_lines(self, enough, timeout, f"{count} access lines")

    def access_line(
        self, path: str | None = None, *, request_id: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The last access line for *path* and/or *request_id*, once written (a
        tunnel's when it ends)."""

        def matches(line: dict[str, Any]) -> bool:
            return (path is None or line.get("path") == path) and (
                request_id is None or line.get("request_id") == request_id
            )

        what = f"an access line for path={path!r} request_id={request_id!r}"
        lines = _wait_for_lines(self, lambda lines: any(map(matches, lines)), timeout, what)
        return [line for line in lines if matches(line)][-1]

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in children.read_text().split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def _wait_for_lines(
    proxy: Proxy, condition: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str
) -> list[dict[str, Any]]:
    """The proxy's access lines, parsed, once *condition* holds for them."""
    lines: list[dict[str, Any]] = []

    def parsed(text: str) -> bool:
        complete = text[: text.rfind("\n") + 1]  # a batch may be half written
        lines[:] = [json.loads(x) for x in complete.splitlines() if x.startswith("{")]
        return condition(lines)

    proxy.logs(until=parsed, timeout=timeout, what=what)
    return lines


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(pid)


def assert_no_secret(response: requests.Response, secret: str = TOKEN) -> None:
    """The secret is in neither the response's headers nor its body."""
    for name, value in response.raw.headers.items():
        assert secret not in name and secret not in value, f"secret leaked in header {name}"
    assert secret.encode() not in response.content, "secret leaked in the response body"
