"""Set, add and remove headers on the upstream request and on the response."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..context import plain_response
from ..errors import ConfigError
from ..headers import environ_key, has_ctl, sanitize
from ..secrets import register_secret
from .templates import Template

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("authproxy.inject")

_RESPONSE_KEYS = frozenset({"set", "add", "remove"})


class _Rule:
    """One header: its name, environ key and compiled value."""

    __slots__ = ("name", "key", "template")

    def __init__(self, name: str, template: Template) -> None:
        self.name = name
        self.key = environ_key(name)
        self.template = template


def _check_name(name: Any, key: str) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in " \t\r\n\0:"):
        raise ConfigError(key, f"not a valid header name: {name!r}")
    return name


def _rules(table: Any, key: str, interval: float, *, secret: bool) -> tuple[_Rule, ...]:
    if table is None:
        return ()
    if not isinstance(table, Mapping):
        raise ConfigError(key, f"expected a table of header = value, got {table!r}")
    rules = []
    for name, value in table.items():
        where = f"{key}.{name}"
        template = Template(value, key=where, check_interval=interval)
        if secret and template.constant is not None:
            register_secret(template.constant)
            _scheme, _, credential = template.constant.partition(" ")
            register_secret(credential)
        rules.append(_Rule(_check_name(name, where), template))
    return tuple(rules)


def _patterns(names: Any, key: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact lower-case names and lower-case prefixes (from ``X-Internal-*``)."""
    if names is None:
        return frozenset(), ()
    if not isinstance(names, (list, tuple)):
        raise ConfigError(key, f"expected a list of header names, got {names!r}")
    exact, prefixes = set(), []
    for name in names:
        if isinstance(name, str) and name.endswith("*"):
            prefixes.append(_check_name(name[:-1] or "*", key).lower())
        else:
            exact.add(_check_name(name, key).lower())
    return frozenset(exact), tuple(prefixes)


class InjectHeaders:
    """Rewrite the headers sent upstream and, optionally, those sent back.

    Applied in this order: ``remove``, then ``set`` (replaces any copy the
    client sent), then ``add`` (appends to it). Values are templates: literal
    text, ``${env:NAME}``, ``${file:PATH}`` (re-read when the file changes) and
    ``${identity:email}`` or any verified claim. Injected values are registered
    as secrets, so the access log and every other log line redact them.

    :param set: header -> template, replacing what the client sent.
    :param add: header -> template, appended to what the client sent.
    :param remove: header names to drop; ``X-Internal-*`` drops a prefix.
    :param response: the same ``set``/``add``/``remove`` for the response.
    :param file_check_interval: seconds between checks of ``${file:...}`` sources.

    A value that renders with CR, LF or NUL is never sent: the request gets a
    generic 500 and the log names the header. A header whose identity claim is
    missing is not sent at all.

    Example::

        app = InjectHeaders(app, set={"Authorization": "Bearer ${file:/var/run/token}"},
                            remove=["Impersonate-*"])
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        set: dict[str, str] | None = None,  # noqa: A002 - the config key's name
        add: dict[str, str] | None = None,
        remove: list[str] | None = None,
        response: dict[str, Any] | None = None,
        file_check_interval: float = 5.0,
    ) -> None:
        self.app = app
        interval = file_check_interval
        self._set = _rules(set, "set", interval, secret=True)
        self._add = _rules(add, "add", interval, secret=True)
        self._remove, self._remove_prefixes = _patterns(remove, "remove")
        self._remove_keys = frozenset(environ_key(n) for n in self._remove)
        self._remove_key_prefixes = tuple(environ_key(p) for p in self._remove_prefixes)
        response = response or {}
        if not isinstance(response, Mapping) or not _RESPONSE_KEYS.issuperset(response):
            raise ConfigError(
                "response", f"expected a table with set, add and/or remove, got {response!r}"
            )
        self._resp_set = _rules(response.get("set"), "response.set", interval, secret=False)
        self._resp_add = _rules(response.get("add"), "response.add", interval, secret=False)
        self._resp_remove, self._resp_remove_prefixes = _patterns(
            response.get("remove"), "response.remove"
        )
        # Set replaces: the response's copies of those names go too.
        self._resp_drop = self._resp_remove | {r.name.lower() for r in self._resp_set}
        self._touches_response = bool(
            self._resp_drop or self._resp_add or self._resp_remove_prefixes
        )

    def describe(self) -> dict[str, Any]:
        """The rules with every value redacted, for ``check-config``."""
        out: dict[str, Any] = {}
        for label, rules in (
            ("set", self._set),
            ("add", self._add),
            ("response.set", self._resp_set),
            ("response.add", self._resp_add),
        ):
            if rules:
                out[label] = {r.name: r.template.describe() for r in rules}
        if self._remove or self._remove_prefixes:
            out["remove"] = sorted(self._remove) + [p + "*" for p in self._remove_prefixes]
        return out

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sanitize(environ)
        prefixes = self._remove_key_prefixes
        if self._remove_keys or prefixes:
            for key in [k for k in environ if k in self._remove_keys or k.startswith(prefixes)]:
                del environ[key]
        for rule in self._set:
            value = rule.template.render(environ)
            if value is None:
                environ.pop(rule.key, None)
                continue
            if rule.template.constant is None and has_ctl(value):
                return self._bad_value(rule, start_response)
            environ[rule.key] = value
        for rule in self._add:
            value = rule.template.render(environ)
            if value is None:
                continue
            if rule.template.constant is None and has_ctl(value):
                return self._bad_value(rule, start_response)
            prior = environ.get(rule.key)
            environ[rule.key] = f"{prior}, {value}" if prior else value
        if not self._touches_response:
            return self.app(environ, start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, self._response_headers(environ, headers), exc_info)

        return self.app(environ, start)

    def _response_headers(
        self, environ: WSGIEnvironment, headers: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        drop, prefixes = self._resp_drop, self._resp_remove_prefixes
        out = [
            (n, v)
            for n, v in headers
            if n.lower() not in drop and not (prefixes and n.lower().startswith(prefixes))
        ]
        for rule in self._resp_set + self._resp_add:
            value = rule.template.render(environ)
            if value is not None and not has_ctl(value):
                out.append((rule.name, value))
            elif value is not None:
                log.error("response header %s rendered with CR/LF/NUL; not sent", rule.name)
        return out

    def _bad_value(self, rule: _Rule, start_response: StartResponse) -> list[bytes]:
        log.error("header %s rendered with CR, LF or NUL; request refused", rule.name)
        return plain_response(start_response, 500)
