"""Finding pipeline steps by name, and checking their options.

A step is a WSGI middleware factory, ``factory(app, /, **options)``, published
under the entry-point group ``authproxy.plugins``. The built-in steps are
registered there too. A factory's keyword-only parameters are its options:
their annotations are checked against the configured values and a parameter
without a default is required.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ._types import conforms, describe
from .errors import ConfigError, PluginError

GROUP = "authproxy.plugins"

Factory = Callable[..., Any]


@dataclass(frozen=True)
class Option:
    name: str
    type: str
    default: Any
    required: bool
    hint: Any


@dataclass(frozen=True)
class Plugin:
    """An installed step: its name, where it comes from, and its factory."""

    name: str
    entry_point: EntryPoint

    @property
    def distribution(self) -> str:
        dist = self.entry_point.dist
        return f"{dist.name} {dist.version}" if dist is not None else "?"

    def load(self) -> Factory:
        return typing.cast(Factory, self.entry_point.load())


def installed() -> dict[str, list[Plugin]]:
    """Every step name in the group, with each distinct entry point that claims it."""
    found: dict[str, list[Plugin]] = {}
    for ep in entry_points(group=GROUP):
        claims = found.setdefault(ep.name, [])
        # The same distribution can be seen twice (e.g. an editable install on
        # two path entries); only distinct targets clash.
        if all(p.entry_point.value != ep.value for p in claims):
            claims.append(Plugin(ep.name, ep))
    return found


def find(name: str, where: str) -> Plugin:
    plugins = installed()
    claims = plugins.get(name)
    if not claims:
        known = ", ".join(sorted(plugins)) or "none"
        raise PluginError(where, f"unknown step {name!r}; installed steps: {known}")
    if len(claims) > 1:
        who = " and ".join(f"{p.entry_point.value} ({p.distribution})" for p in claims)
        raise PluginError(where, f"step name {name!r} is claimed by {who}; uninstall one")
    return claims[0]


def load(name: str, where: str = "use") -> Factory:
    plugin = find(name, where)
    try:
        return plugin.load()
    except Exception as exc:
        raise PluginError(
            where, f"step {name!r} ({plugin.entry_point.value}) failed to import: {exc!r}"
        ) from exc


def options(factory: Factory) -> tuple[list[Option], bool]:
    """The options *factory* declares, and whether it also takes ``**kwargs``."""
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    found, open_ended = [], False
    for param in inspect.signature(factory).parameters.values():
        if param.kind is param.VAR_KEYWORD:
            open_ended = True
        if param.kind is not param.KEYWORD_ONLY:
            continue
        hint = hints.get(param.name, Any)
        required = param.default is param.empty
        found.append(
            Option(
                param.name,
                describe(hint),
                None if required else param.default,
                required,
                hint,
            )
        )
    return found, open_ended


def instantiate(factory: Factory, app: Any, values: Mapping[str, Any], where: str) -> Any:
    """Check *values* against the factory's options, then build the step."""
    declared, open_ended = options(factory)
    by_name = {o.name: o for o in declared}
    for key, value in values.items():
        option = by_name.get(key)
        if option is None:
            if open_ended:
                continue
            known = ", ".join(sorted(by_name)) or "none"
            raise PluginError(f"{where}.{key}", f"unknown option; this step takes: {known}")
        if not conforms(value, option.hint):
            raise PluginError(f"{where}.{key}", f"expected {option.type}, got {value!r}")
    for option in declared:
        if option.required and option.name not in values:
            raise PluginError(f"{where}.{option.name}", f"required option is missing ({option.type})")
    try:
        return factory(app, **values)
    except ConfigError as exc:
        raise type(exc)(f"{where}.{exc.key}" if exc.key else where, exc.problem) from None
    except (TypeError, ValueError) as exc:
        raise PluginError(where, str(exc)) from None
