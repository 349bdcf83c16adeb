"""Serving the pipeline with gunicorn, in-process (``authproxy serve``)."""

from __future__ import annotations

import warnings
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from ..config import Config
from ..pipeline import build_app
from .logs import logconfig_dict
from .worker import Worker


def gunicorn_settings(config: Config) -> dict[str, Any]:
    """The gunicorn settings for *config*'s ``[server]`` section."""
    s = config.server
    return {
        "bind": [s.listen],
        "workers": s.workers,
        # gunicorn swaps "sync" for its gthread worker when threads > 1.
        "threads": 1 if s.worker_class == "sync" else s.threads,
        "worker_class": _worker_class(config),
        # gunicorn takes whole seconds here.
        "timeout": max(1, round(s.timeout)),
        "graceful_timeout": max(1, round(s.graceful_timeout)),
        "keepalive": max(0, round(s.keepalive)),
        "forwarded_allow_ips": s.forwarded_allow_ips,
        # No SCRIPT_NAME/PATH_INFO from request headers, even from a trusted
        # peer: every path decision is made on the raw target anyway.
        "forwarder_headers": "",
        # Workers binding one Unix socket path would unlink each other's.
        "reuse_port": s.reuse_port and not s.listen.startswith("unix:"),
        "limit_request_line": s.limit_request_line,
        "limit_request_fields": s.limit_request_fields,
        "limit_request_field_size": s.limit_request_field_size,
        "accesslog": None,  # the pipeline's access-log step writes the access log
        "logger_class": "authproxy.serve.gunicorn.GunicornLogger",
        "errorlog": "-",
        "loglevel": s.log_level,
        "logconfig_dict": logconfig_dict(s.log_level),
        "proc_name": "authproxy",
    }


def _worker_class(config: Config) -> Any:
    """gunicorn's name for *config*'s worker; authproxy's own with its [server] timeouts."""
    s = config.server
    if s.worker_class != "authproxy":
        return s.worker_class
    # Named as gunicorn logs a worker it imported by name ("Using worker: ...").
    return type(
        f"{Worker.__module__}.{Worker.__qualname__}",
        (Worker,),
        {
            "__module__": Worker.__module__,
            "header_timeout": s.header_timeout,
            "body_timeout": s.body_timeout,
        },
    )


class GunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger without its access log: the access-log step writes that.

    gunicorn would otherwise gather its access-line fields for every request
    (it does whenever a logging config is set), only to drop the line.
    """

    def _compute_access_log_enabled(self) -> bool:
        return False

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


class Server(BaseApplication):  # type: ignore[misc]
    """gunicorn running the pipeline built from *config*; each worker builds its own."""

    def __init__(self, config: Config) -> None:
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_settings(self.config).items():
            self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 25 opens a control socket under $HOME by default: a
            # sidecar with a read-only root file system has no use for it.
            self.cfg.set("control_socket_disable", True)
        if self.config.server.worker_class == "gevent":
            # The worker patches ssl after urllib3 imported it; _gevent_tls()
            # repairs the one reference that matters, so the warning is noise.
            warnings.filterwarnings("ignore", message="Monkey-patching ssl after ssl")

    def load(self) -> Any:
        if self.config.server.worker_class == "gevent":
            _gevent_tls()
        return build_app(self.config)


def _gevent_tls() -> None:
    """Let TLS to the upstream yield to other greenlets under the gevent worker.

    The worker monkey-patches ``ssl`` after the fork, but urllib3 was imported
    in the master and kept its own reference to the unpatched ``SSLContext``:
    every upstream TLS read would block the whole worker. Point it at the
    patched class before the forwarder makes its pool.
    """
    import ssl

    import urllib3.util.ssl_

    urllib3.util.ssl_.SSLContext = ssl.SSLContext  # type: ignore[assignment]


def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT; in-flight requests get ``graceful_timeout`` to finish."""
    Server(config).run()
