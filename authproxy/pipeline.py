"""Turning a :class:`~authproxy.config.Config` into the WSGI stack.

Outside in::

    edge: hop-by-hop and Impersonate-* stripping, last-resort 500
    health (live/ready)  ->  request id  ->  [[pipeline]] steps in order  ->  forwarder

The ``cross-origin`` step is always in the stack: unless the config lists it
itself (its place and options are then the config's), the builder puts it
just before the first step that is not ``access-log``, so that the access log
sees its refusals and it runs before anything adds a credential.

The builder knows nothing of any step's options beyond passing them. A step
whose factory has an ``authproxy_after`` attribute (a tuple of step names) must
come after each of those steps in ``[[pipeline]]``; otherwise the config is
refused (``impersonate`` needs ``identity`` before it).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import plugins
from .config import Config, Step, from_mapping
from .context import STEP, UPSTREAM_URL, plain_response
from .errors import ConfigError
from .headers import sanitize
from .middleware.health import Health
from .middleware.request_id import RequestId
from .upstream.forwarder import Forwarder

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("authproxy.pipeline")


class _Guard:
    """Turns an exception raised by one step into a generic 500 that names the step in the log."""

    __slots__ = ("app", "name")

    def __init__(self, app: WSGIApplication, name: str) -> None:
        self.app = app
        self.name = name

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self.app(environ, start_response)
        except Exception:
            environ[STEP] = self.name
            log.exception("step %r failed on %s", self.name, environ.get("PATH_INFO"))
            return plain_response(start_response, 500, exc_info=sys.exc_info())


class Pipeline:
    """The built stack: a WSGI app, with its parts kept for inspection.

    ``steps`` lists ``(name, middleware)`` from outermost to innermost, and
    ``specs`` the :class:`~authproxy.config.Step` each was built from (the
    config's, plus the ``cross-origin`` step when the builder added it);
    ``forwarder`` is the :class:`~authproxy.upstream.forwarder.Forwarder` at the core.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        # Every step found and in a possible order before anything starts a thread.
        self.specs = with_cross_origin(config.pipeline)
        factories = [plugins.load(step.use, f"{step.where}.use") for step in self.specs]
        for index, (step, factory) in enumerate(zip(self.specs, factories, strict=True)):
            _check_after(factory, step.where, [s.use for s in self.specs[:index]])
        # [upstream] holds exactly the Forwarder's options, under the same names.
        self.forwarder = Forwarder(
            **dataclasses.asdict(config.upstream), pool_size=_pool_size(config)
        )
        app: Any = _Guard(self.forwarder, "forwarder")
        built: list[tuple[str, Any]] = []
        for step, factory in reversed(list(zip(self.specs, factories, strict=True))):
            middleware = plugins.instantiate(factory, app, step.options, step.where)
            built.append((step.use, middleware))
            app = _Guard(middleware, step.use)
        self.steps = list(reversed(built))
        rid = config.request_id
        app = RequestId(app, header=rid.header, trust_incoming=rid.trust_incoming)
        self.app = Health(
            app,
            live=config.health.live,
            ready=config.health.ready,
            # A step that can be unready (the identity step without keys) says so
            # through a check_ready() method; /readyz asks every one of them.
            checks=[
                self.forwarder.check_ready,
                *(
                    step.check_ready
                    for _, step in self.steps
                    if callable(getattr(step, "check_ready", None))
                ),
            ],
        )
        self._strip_impersonation = config.upstream.strip_impersonation

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sanitize(environ, strip_impersonation=self._strip_impersonation)
        # Known before any step runs, so a plugin can use it on the way in.
        environ[UPSTREAM_URL] = self.forwarder.url
        return self.app(environ, start_response)

    def close(self) -> None:
        for _name, step in self.steps:
            close = getattr(step, "close", None)
            if callable(close):
                close()
        self.forwarder.close()


def _check_after(factory: Any, where: str, before: list[str]) -> None:
    """Refuse a step listed before the steps its factory says it needs first."""
    after = getattr(factory, "authproxy_after", ())
    if isinstance(after, str):
        after = (after,)
    for needed in after:
        if needed not in before:
            raise ConfigError(
                where, f"needs the {needed!r} step before it in [[pipeline]] (it reads its result)"
            )


CROSS_ORIGIN = "cross-origin"
#: What the added step is called in error messages and ``check-config``.
ADDED_WHERE = "cross-origin (added by default)"


def with_cross_origin(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """*steps* with the ``cross-origin`` step put in, unless they list it already:
    after the leading ``access-log`` steps, before everything else."""
    if any(step.use == CROSS_ORIGIN for step in steps):
        return steps
    at = 0
    while at < len(steps) and steps[at].use == "access-log":
        at += 1
    return (*steps[:at], Step(CROSS_ORIGIN, {}, ADDED_WHERE), *steps[at:])


def _pool_size(config: Config) -> int:
    """Upstream connections to keep: one per thread, or, for the async workers
    (one connection per greenlet), as many as gunicorn lets a worker hold."""
    if config.server.worker_class in ("authproxy", "gthread", "sync"):
        return config.server.threads
    return 1000  # gunicorn's worker_connections


def build_app(config: Config | Mapping[str, Any]) -> Pipeline:
    """Build the WSGI app for *config* (a :class:`Config`, or a dict shaped like the TOML)."""
    if not isinstance(config, Config):
        config = from_mapping(config)
    return Pipeline(config)
