"""Serving the pipeline with gunicorn, in-process (``authproxy serve``)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from .config import Config
from .logs import logconfig_dict
from .pipeline import build_app


def gunicorn_settings(config: Config) -> dict[str, Any]:
    """The gunicorn settings for *config*'s ``[server]`` section."""
    s = config.server
    return {
        "bind": [s.listen],
        "workers": s.workers,
        "threads": s.threads,
        "worker_class": s.worker_class,
        # gunicorn takes whole seconds here.
        "timeout": max(1, round(s.timeout)),
        "graceful_timeout": max(1, round(s.graceful_timeout)),
        "keepalive": max(0, round(s.keepalive)),
        "forwarded_allow_ips": s.forwarded_allow_ips,
        "accesslog": None,  # the pipeline's access-log step writes the access log
        "errorlog": "-",
        "loglevel": s.log_level,
        "logconfig_dict": logconfig_dict(s.log_level),
        "proc_name": "authproxy",
    }


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

    def load(self) -> Any:
        return build_app(self.config)


def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT; in-flight requests get ``graceful_timeout`` to finish."""
    Server(config).run()
