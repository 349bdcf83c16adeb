"""Liveness and readiness endpoints, answered locally."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..context import plain_response, request_path

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


class Health:
    """Answer ``live`` and ``ready`` paths before anything else runs.

    They never reach the upstream and never need an identity, so a kubelet
    probe works while the identity step refuses everyone (for example while
    the key endpoint is down).

    :param live: path that answers ``200 ok`` while the process serves.
    :param ready: path that answers ``200 ok`` when every check passes, else ``503``.
    :param checks: callables returning True when ready (e.g. the upstream is reachable);
        each is expected to cache its own answer.

    Example::

        app = Health(app, live="/healthz", ready="/readyz", checks=[forwarder.check_ready])
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        live: str | None = "/healthz",
        ready: str | None = "/readyz",
        checks: Iterable[Callable[[], bool]] = (),
    ) -> None:
        for key, value in (("live", live), ("ready", ready)):
            if value is not None and not value.startswith("/"):
                raise ValueError(f"health.{key}: expected a path starting with '/', got {value!r}")
        self.app = app
        self.live = live
        self.ready = ready
        self.checks = tuple(checks)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # The path the forwarder would send, not PATH_INFO (see request_path).
        path = request_path(environ)
        if path == self.live:
            return plain_response(start_response, 200, "ok")
        if path == self.ready:
            if all(check() for check in self.checks):
                return plain_response(start_response, 200, "ok")
            return plain_response(start_response, 503, "not ready")
        return self.app(environ, start_response)
