"""Loading and validating the configuration (TOML file or the Go program's variables).

Where the configuration comes from, first match wins:

1. ``--config PATH`` (the ``path`` argument);
2. ``$AUTHPROXY_CONFIG``;
3. ``./authproxy.toml``;
4. the Go sidecar's variables: ``DASHBOARD_PROXY_URL`` (upstream),
   ``LISTEN_ADDRESS`` (``:8080`` style, default ``0.0.0.0:8000``) and
   ``DASHBOARD_TOKEN`` (required, injected as ``Authorization: Bearer ...``),
   with a JSON access log.

A file named by 1 or 2 wins over ``DASHBOARD_PROXY_URL`` with a warning that
names both. ``./authproxy.toml`` beside ``DASHBOARD_PROXY_URL`` is an error:
nothing said which of the two was meant, and a stray file must not silently
replace a working drop-in's upstream and token. The source that was loaded is
logged at INFO (``authproxy.config``), never a value from it.

Every error is a :class:`~authproxy.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._types import conforms, describe
from .errors import ConfigError

DEFAULT_FILE = "authproxy.toml"
#: The Go sidecar's variables, in the order its README lists them.
GO_VARIABLES = ("DASHBOARD_PROXY_URL", "DASHBOARD_TOKEN", "LISTEN_ADDRESS")
#: gunicorn's own bounds for its request limits (gunicorn.http.message).
_MAX_REQUEST_LINE = 8190
_MAX_REQUEST_FIELDS = 32768

log = logging.getLogger("authproxy.config")
_WORKER_CLASSES = ("authproxy", "gthread", "sync", "gevent", "eventlet", "tornado")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0:8000"
    workers: int = 2
    threads: int = 16
    #: "authproxy": an event loop holds idle, slow, streaming and tunnelled
    #: connections, threads run requests (see authproxy.serve.worker); or one of
    #: gunicorn's own workers.
    worker_class: str = "authproxy"
    #: gunicorn's worker heartbeat timeout (not a request timeout).
    timeout: float = 30.0
    #: seconds a request head may take to arrive in full (slow clients are closed).
    header_timeout: float = 10.0
    #: seconds a request body may stall between bytes before the request ends
    #: with 408 (authproxy worker).
    body_timeout: float = 60.0
    #: seconds in-flight requests get to finish after SIGTERM.
    graceful_timeout: float = 25.0
    keepalive: float = 75.0
    #: addresses whose X-Forwarded-Proto gunicorn believes.
    forwarded_allow_ips: str = "127.0.0.1,::1"
    log_level: str = "info"
    #: a listening socket per worker (SO_REUSEPORT), so the kernel spreads new
    #: connections over the workers instead of the first to wake taking most;
    #: off by default: connections queued at a stalled worker wait for it.
    reuse_port: bool = False
    #: longest request line (method, target, version) in bytes; longer: 414.
    #: 0 to 8190 (gunicorn's ceiling; 0 lets gunicorn take up to that).
    limit_request_line: int = 4094
    #: most header fields in a request; more: 431. 1 to 32768.
    limit_request_fields: int = 100
    #: longest header field (name and value) in bytes; longer: 431. An Access
    #: cookie plus the app's own cookies can pass the default.
    limit_request_field_size: int = 8190


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = ""
    tls_verify: bool | str = True
    client_cert: str | None = None
    client_key: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    preserve_host: bool = False
    strip_impersonation: bool = True
    #: relay WebSocket/Upgrade requests through the server's raw socket.
    websocket: bool = True
    websocket_idle_timeout: float | None = 3600.0
    #: seconds after which any tunnel closes (0: no limit); a tunnel opened with
    #: a verified token also closes when the token expires.
    websocket_max_lifetime: float | None = 12 * 3600.0
    #: Upgrade protocols relayed as tunnels; any other is removed and the
    #: request forwarded as plain HTTP ("SPDY/3.1" for kubectl exec-style clients).
    upgrades: tuple[str, ...] = ("websocket",)


@dataclass(frozen=True)
class HealthConfig:
    live: str | None = "/healthz"
    ready: str | None = "/readyz"


@dataclass(frozen=True)
class RequestIdConfig:
    header: str = "X-Request-ID"
    trust_incoming: bool = True


@dataclass(frozen=True)
class Step:
    """One ``[[pipeline]]`` entry: the step's name and its options."""

    use: str
    options: Mapping[str, Any]
    where: str


@dataclass(frozen=True)
class Config:
    upstream: UpstreamConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    request_id: RequestIdConfig = field(default_factory=RequestIdConfig)
    pipeline: tuple[Step, ...] = ()
    source: str = "<python>"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "health": HealthConfig,
    "request_id": RequestIdConfig,
}


def _section(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(name, f"expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{name}.{key}", f"unknown key; [{name}] takes: {', '.join(sorted(known))}"
            )
        if not conforms(value, hints[key]):
            raise ConfigError(f"{name}.{key}", f"expected {describe(hints[key])}, got {value!r}")
    return cls(**data)


def from_mapping(data: Mapping[str, Any], source: str = "<python>") -> Config:
    """Build a :class:`Config` from parsed TOML (or an equal dict), validating it."""
    for key in data:
        if key not in _SECTIONS and key != "pipeline":
            raise ConfigError(
                key, f"unknown section; expected {', '.join([*_SECTIONS, 'pipeline'])}"
            )
    sections = {name: _section(name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()}
    upstream: UpstreamConfig = sections["upstream"]
    if not upstream.url:
        raise ConfigError("upstream.url", "required: the URL of the app to protect")
    try:
        url = urlsplit(upstream.url)
        url.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError as exc:
        raise ConfigError("upstream.url", f"not a valid URL: {upstream.url!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            "upstream.url", f"expected an http:// or https:// URL with a host, got {upstream.url!r}"
        )
    if isinstance(upstream.tls_verify, str) and not os.path.exists(upstream.tls_verify):
        raise ConfigError("upstream.tls_verify", f"CA bundle {upstream.tls_verify!r} not found")
    for key in ("client_cert", "client_key"):
        path = getattr(upstream, key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"upstream.{key}", f"file {path!r} not found")
    if upstream.client_key is not None and upstream.client_cert is None:
        raise ConfigError("upstream.client_key", "given without upstream.client_cert")
    server: ServerConfig = sections["server"]
    _check_listen(server.listen, "server.listen")
    for key in ("workers", "threads"):
        if getattr(server, key) < 1:
            raise ConfigError(f"server.{key}", f"expected at least 1, got {getattr(server, key)}")
    for key in ("timeout", "graceful_timeout", "header_timeout", "body_timeout"):
        if not getattr(server, key) > 0:
            raise ConfigError(
                f"server.{key}", f"expected a positive number, got {getattr(server, key)!r}"
            )
    if server.keepalive < 0:
        raise ConfigError("server.keepalive", f"expected 0 or more, got {server.keepalive!r}")
    if server.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(
            "server.log_level", f"expected one of {_LOG_LEVELS}, got {server.log_level!r}"
        )
    _check_limits(server)
    if server.worker_class not in _WORKER_CLASSES:
        raise ConfigError(
            "server.worker_class", f"expected one of {_WORKER_CLASSES}, got {server.worker_class!r}"
        )
    health: HealthConfig = sections["health"]
    for key in ("live", "ready"):
        path = getattr(health, key)
        if path is not None and not path.startswith("/"):
            raise ConfigError(f"health.{key}", f"expected a path starting with '/', got {path!r}")
    raw_pipeline = data.get("pipeline", [])
    if not isinstance(raw_pipeline, list):
        raise ConfigError("pipeline", "expected an array of tables ([[pipeline]])")
    steps = []
    for i, entry in enumerate(raw_pipeline):
        where = f"pipeline[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(where, f"expected a table, got {entry!r}")
        use = entry.get("use")
        if not isinstance(use, str) or not use:
            raise ConfigError(f"{where}.use", "required: the name of the step")
        options = {k: v for k, v in entry.items() if k != "use"}
        steps.append(Step(use, options, f"{where} ({use})"))
    return Config(
        upstream=upstream,
        server=server,
        health=health,
        request_id=sections["request_id"],
        pipeline=tuple(steps),
        source=source,
    )


def _check_limits(server: ServerConfig) -> None:
    for key, low, high in (
        ("limit_request_line", 0, _MAX_REQUEST_LINE),
        ("limit_request_fields", 1, _MAX_REQUEST_FIELDS),
        ("limit_request_field_size", 1, None),
    ):
        value = getattr(server, key)
        if value < low or (high is not None and value > high):
            expected = f"{low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"server.{key}", f"expected {expected}, got {value!r}")


def _check_listen(value: str, key: str) -> None:
    if value.startswith("unix:"):
        return
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT or unix:PATH, got {value!r}")


def listen_from_go(value: str) -> str:
    """Go's ``:8080`` means every interface, IPv6 and IPv4 alike: ``[::]:8080`` on a
    machine with dual-stack IPv6 sockets, ``0.0.0.0:8080`` where it has no IPv6
    (or its IPv6 sockets take IPv6 only). Anything else is kept as given."""
    if not value.startswith(":"):
        return value
    return ("[::]" if _dual_stack() else "0.0.0.0") + value


@functools.cache
def _dual_stack() -> bool:
    """True if a socket bound to ``::`` here also takes IPv4 clients.

    gunicorn leaves ``IPV6_V6ONLY`` at the system's default
    (``net.ipv6.bindv6only``, 0 on Linux): a socket that comes up with it set
    would shut IPv4 clients (the kubelet's probes, often) out.
    """
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            if probe.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                return False
            probe.bind(("::", 0))
    except OSError:  # no IPv6 in this kernel or network namespace
        return False
    return True


def from_environment(env: Mapping[str, str]) -> Config:
    """The Go sidecar's configuration: DASHBOARD_PROXY_URL, LISTEN_ADDRESS, DASHBOARD_TOKEN.

    As in the Go program, ``DASHBOARD_TOKEN`` is required: a drop-in that
    started without it would forward the client's own ``Authorization``.
    """
    token = env.get("DASHBOARD_TOKEN")
    if not token:
        state = "is empty" if token is not None else "is not set"
        raise ConfigError(
            "DASHBOARD_TOKEN",
            f"required with DASHBOARD_PROXY_URL (the token injected as Authorization: Bearer),"
            f" but it {state}",
        )
    value = "Bearer " + token.replace("$", "$$")  # a literal, never a template
    pipeline: list[dict[str, Any]] = [
        {"use": "access-log", "format": "json"},
        {"use": "inject-headers", "set": {"Authorization": value}},
    ]
    data: dict[str, Any] = {
        "upstream": {"url": env.get("DASHBOARD_PROXY_URL", "")},
        "pipeline": pipeline,
    }
    if env.get("LISTEN_ADDRESS"):
        data["server"] = {"listen": listen_from_go(env["LISTEN_ADDRESS"])}
    used = ", ".join(name for name in GO_VARIABLES if env.get(name))
    try:
        return from_mapping(data, source=f"environment ({used})")
    except ConfigError as exc:
        names = {"upstream.url": "DASHBOARD_PROXY_URL", "server.listen": "LISTEN_ADDRESS"}
        raise ConfigError(names.get(exc.key, exc.key), exc.problem) from None


def load_file(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "config file not found") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from None
    return from_mapping(data, source=path)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Find and load the configuration (see the module docstring for the order)."""
    env = os.environ if env is None else env
    go_mode = bool(env.get("DASHBOARD_PROXY_URL"))
    path = path or env.get("AUTHPROXY_CONFIG")
    if not path and os.path.exists(DEFAULT_FILE):
        if go_mode:
            raise ConfigError(
                DEFAULT_FILE,
                f"found in {os.getcwd()} while DASHBOARD_PROXY_URL is set: pass"
                f" --config {DEFAULT_FILE} (or set AUTHPROXY_CONFIG) to use the file, or"
                " remove the file to use the Go variables",
            )
        path = DEFAULT_FILE
    if path:
        config = load_file(path)
        shown = os.path.abspath(path)
        if go_mode:
            log.warning(
                "configuration file %s is used; DASHBOARD_PROXY_URL and the other Go"
                " variables are ignored",
                shown,
            )
    elif go_mode:
        config = from_environment(env)
        shown = config.source
    else:
        stray = [name for name in GO_VARIABLES if env.get(name)]
        hint = f" ({' and '.join(stray)} alone are not enough)" if stray else ""
        raise ConfigError(
            "DASHBOARD_PROXY_URL" if stray else "upstream.url",
            "no configuration: pass --config PATH, set AUTHPROXY_CONFIG, create ./authproxy.toml, "
            f"or set DASHBOARD_PROXY_URL and DASHBOARD_TOKEN{hint}",
        )
    log.info("configuration: %s", shown)
    return config
