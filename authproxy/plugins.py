"""Finding pipeline steps by name, and checking their options.

A step is a WSGI middleware factory, ``factory(app, /, **options)``, published
under the entry-point group ``authproxy.plugins``. The built-in steps are
registered there too; nothing here special-cases them. A factory declares its
options by its keyword-only parameters, or, when it takes ``**options``, by a
dataclass it names in its ``authproxy_options`` attribute. Each option's
annotation is checked against the configured value, and an option without a
default is required. ``docs/plugins.md`` is the guide for plugin authors.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from ._types import conforms, describe
from .errors import ConfigError, PluginError

GROUP = "authproxy.plugins"
#: The attribute through which a factory names the dataclass of its options.
OPTIONS_ATTRIBUTE = "authproxy_options"

Factory = Callable[..., Any]

# An option whose name says it holds a credential is never echoed in an error.
_SECRET_NAME = re.compile(r"token|secret|password|passwd|credential", re.I)
_UNIONS = (typing.Union, types.UnionType)
_PARAM_DOC = re.compile(r":param\s+(\w+):\s*(.+?)(?=\n\s*:\w|\n\s*\n|\Z)", re.S)


@dataclass(frozen=True)
class Option:
    """One option of a step: ``type`` is readable text, ``hint`` the annotation itself."""

    name: str
    type: str
    default: Any
    required: bool
    hint: Any
    doc: str = ""


@dataclass(frozen=True)
class Plugin:
    """An installed step: its name, where it comes from, and its factory."""

    name: str
    entry_point: EntryPoint

    @property
    def dist_name(self) -> str:
        dist = self.entry_point.dist
        return dist.name if dist is not None else "?"

    @property
    def version(self) -> str:
        dist = self.entry_point.dist
        return dist.version if dist is not None else "?"

    @property
    def distribution(self) -> str:
        """``"name version"`` of the distribution that publishes it."""
        return f"{self.dist_name} {self.version}"

    def load(self) -> Factory:
        factory = self.entry_point.load()
        if not callable(factory):
            raise TypeError(f"{self.entry_point.value} is not callable")
        return cast(Factory, factory)


def installed() -> dict[str, list[Plugin]]:
    """Every step name in the group, with each distribution that claims it."""
    found: dict[str, list[Plugin]] = {}
    for ep in entry_points(group=GROUP):
        claims = found.setdefault(ep.name, [])
        plugin = Plugin(ep.name, ep)
        # One distribution seen twice (e.g. on two path entries) is one claim.
        if all(p.dist_name != plugin.dist_name for p in claims):
            claims.append(plugin)
    return found


def find(name: str, where: str) -> Plugin:
    """The one installed step called *name*; a :class:`PluginError` if none or several."""
    plugins = installed()
    claims = plugins.get(name)
    if not claims:
        known = ", ".join(sorted(plugins)) or "none"
        close = difflib.get_close_matches(name, plugins, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PluginError(where, f"unknown step {name!r}; {hint}installed steps: {known}")
    if len(claims) > 1:
        who = " and ".join(f"{p.distribution} ({p.entry_point.value})" for p in claims)
        raise PluginError(
            where, f"step name {name!r} is claimed by two distributions, {who}; uninstall one"
        )
    return claims[0]


def load(name: str, where: str = "use") -> Factory:
    """Import the factory of the step called *name*."""
    plugin = find(name, where)
    try:
        return plugin.load()
    except Exception as exc:
        raise PluginError(
            where,
            f"step {name!r} ({plugin.entry_point.value}, {plugin.distribution}) "
            f"failed to load: {exc!r}",
        ) from exc


def summary(factory: Factory) -> str:
    """The first paragraph of the factory's docstring, on one line."""
    doc = (inspect.getdoc(factory) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def _param_docs(factory: Factory) -> dict[str, str]:
    doc = inspect.getdoc(factory) or ""
    return {m[1]: " ".join(m[2].split()) for m in _PARAM_DOC.finditer(doc)}


def _resolve(annotation: Any, namespace: Mapping[str, Any]) -> Any:
    """One annotation, evaluated on its own (as :func:`typing.get_type_hints` would), so that
    a name imported only under ``TYPE_CHECKING`` (the ``app`` type, usually) spoils nothing."""
    if annotation is inspect.Parameter.empty:
        return Any
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, dict(namespace))  # noqa: S307 - the plugin's own annotation
    except Exception:
        return Any


def options(factory: Factory) -> tuple[list[Option], bool]:
    """The options *factory* declares, and whether it also takes other ``**options``."""
    docs = _param_docs(factory)
    declared = getattr(factory, OPTIONS_ATTRIBUTE, None)
    if declared is not None:
        if not (isinstance(declared, type) and dataclasses.is_dataclass(declared)):
            raise TypeError(f"{OPTIONS_ATTRIBUTE} must be a dataclass, got {declared!r}")
        namespace = vars(sys.modules.get(declared.__module__, sys))
        found = []
        for f in dataclasses.fields(declared):
            if not f.init:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            hint = _resolve(f.type, namespace)
            doc = docs.get(f.name, "")
            found.append(Option(f.name, describe(hint), default, required, hint, doc))
        return found, False
    target = factory.__init__ if inspect.isclass(factory) else factory
    namespace = getattr(inspect.unwrap(target), "__globals__", {})
    found, open_ended = [], False
    for param in inspect.signature(factory).parameters.values():
        if param.kind is param.VAR_KEYWORD:
            open_ended = True
        if param.kind is not param.KEYWORD_ONLY:
            continue
        hint = _resolve(param.annotation, namespace)
        required = param.default is param.empty
        found.append(
            Option(
                param.name,
                describe(hint),
                None if required else param.default,
                required,
                hint,
                docs.get(param.name, ""),
            )
        )
    return found, open_ended


def _shown(key: str, value: Any) -> str:
    if _SECRET_NAME.search(key) and isinstance(value, str):
        return "*** (a string, not shown)"
    return repr(value)


def check(factory: Factory, values: Mapping[str, Any], where: str) -> None:
    """Raise a :class:`PluginError` naming the step, the option, the value and what
    was expected, unless *values* fit the options *factory* declares."""
    declared, open_ended = options(factory)
    by_name = {o.name: o for o in declared}
    for key, value in values.items():
        option = by_name.get(key)
        if option is None:
            if open_ended:
                continue
            close = difflib.get_close_matches(key, by_name, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(by_name)) or "none"
            raise PluginError(
                f"{where}.{key}",
                f"unknown option (value {_shown(key, value)}); {hint}this step takes: {known}",
            )
        if not conforms(value, option.hint):
            inner, hint, bad = _misfit(value, option.hint)
            raise PluginError(
                f"{where}.{key}{inner}",
                f"expected {describe(hint)}, got {_shown(key + inner, bad)}",
            )
    for option in declared:
        if option.required and option.name not in values:
            raise PluginError(
                f"{where}.{option.name}", f"required option missing, expected {option.type}"
            )


def _misfit(value: Any, hint: Any) -> tuple[str, Any, Any]:
    """Where in *value* (a table) the part that does not fit *hint* is:
    ``(".Authorization", str, 5)`` for ``{Authorization = 5}`` against
    ``dict[str, str] | None``, so that the error names the inner key. ``("", hint,
    value)`` when the value itself is the wrong kind. An array is shown whole."""
    members = typing.get_args(hint) if typing.get_origin(hint) in _UNIONS else (hint,)
    for member in members:
        origin, args = typing.get_origin(member), typing.get_args(member)
        if isinstance(value, Mapping) and origin in (dict, Mapping) and len(args) == 2:
            for k, v in value.items():
                if not conforms(k, args[0]):
                    return f".{k}", args[0], k
                if not conforms(v, args[1]):
                    inner, inner_hint, bad = _misfit(v, args[1])
                    return f".{k}{inner}", inner_hint, bad
    return "", hint, value


def instantiate(factory: Factory, app: Any, values: Mapping[str, Any], where: str) -> Any:
    """Check *values* against the factory's options, then build the step."""
    check(factory, values, where)
    try:
        return factory(app, **values)
    except ConfigError as exc:
        raise type(exc)(f"{where}.{exc.key}" if exc.key else where, exc.problem) from None
    except (TypeError, ValueError) as exc:
        raise PluginError(where, str(exc)) from None
    except Exception as exc:
        raise PluginError(where, f"failed to start: {type(exc).__name__}: {exc}") from None
