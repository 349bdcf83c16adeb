"""Header value templates: literal text with ``${env:NAME}``, ``${file:PATH}``
and ``${identity:CLAIM}`` sources, compiled once at start-up.

``$$`` is a literal ``$``. An environment variable is read once, at start-up. A
file is re-read when its inode, size or mtime changes, checked at most every
``check_interval`` seconds (Kubernetes rotates projected service-account tokens
hourly); if it vanishes or cannot be read the last good value stays and one
warning is logged. A missing variable or file at start-up is a
:class:`~authproxy.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..context import IDENTITY
from ..errors import ConfigError
from ..headers import has_ctl
from ..secrets import register_secret

log = logging.getLogger("authproxy.templates")

_TOKEN = re.compile(r"\$\$|\$\{([a-z]+):([^}]*)\}|\$\{?")
_IDENTITY_FIELDS = ("email", "subject", "service_token", "issuer", "name", "groups")


class FileSource:
    """The stripped text of a file, re-read when the file changes."""

    def __init__(self, path: str, key: str, check_interval: float) -> None:
        self.path = path
        self.key = key
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = 0.0
        self._failing = False
        try:
            self.value = self._read()
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
        if not self.value:
            raise ConfigError(key, f"{path!r} is empty")
        self._checked = time.monotonic()

    def _read(self) -> str:
        with open(self.path, "rb") as f:
            stat = os.fstat(f.fileno())
            text = f.read().decode("utf-8").strip()
        self._stamp = (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)
        register_secret(text)
        return text

    def get(self) -> str:
        if time.monotonic() - self._checked >= self.check_interval:
            self._refresh()
        return self.value

    def _refresh(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another thread is at it; use the current value
        try:
            self._checked = time.monotonic()
            try:
                stat = os.stat(self.path)
                stamp = (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)
                if stamp == self._stamp:
                    return
                value = self._read()
                if not value:
                    raise OSError("file is empty")
            except (OSError, UnicodeDecodeError) as exc:
                if not self._failing:
                    log.warning(
                        "%s: cannot read %s (%s); keeping the last good value",
                        self.key,
                        self.path,
                        getattr(exc, "strerror", None) or exc,
                    )
                    self._failing = True
                return
            if self._failing:
                log.warning("%s: %s is readable again", self.key, self.path)
            self._failing = False
            self.value = value
        finally:
            self._lock.release()


class Template:
    """A compiled header value. :meth:`render` runs per request.

    ``kinds`` lists the sources used (``literal``, ``env``, ``file``,
    ``identity``), for ``check-config`` to show without showing the value.
    """

    def __init__(self, text: str, *, key: str, check_interval: float = 5.0) -> None:
        if not isinstance(text, str):
            raise ConfigError(key, f"expected a string, got {text!r}")
        self.key = key
        self.source = text
        self.kinds: list[str] = []
        # parts: str (fixed) | FileSource | ("identity", field)
        parts: list[Any] = []
        pos = 0
        for match in _TOKEN.finditer(text):
            if match.start() > pos:
                parts.append(text[pos : match.start()])
                self._kind("literal")
            pos = match.end()
            token = match.group(0)
            if token == "$$":
                parts.append("$")
                continue
            kind, arg = match.group(1), match.group(2)
            if kind is None:
                raise ConfigError(key, f"unfinished ${{...}} at offset {match.start()} in template")
            if kind == "env":
                if arg not in os.environ:
                    raise ConfigError(key, f"environment variable {arg!r} is not set")
                value = os.environ[arg]
                register_secret(value)
                parts.append(value)
            elif kind == "file":
                parts.append(FileSource(arg, key, check_interval))
            elif kind == "identity":
                if not arg:
                    raise ConfigError(key, "${identity:} needs a claim name")
                parts.append(("identity", arg))
            else:
                raise ConfigError(
                    key, f"unknown source ${{{kind}:...}}; expected env, file or identity"
                )
            self._kind(kind)
        if pos < len(text):
            parts.append(text[pos:])
            self._kind("literal")
        # Merge adjacent fixed strings so a constant renders with no work.
        merged: list[Any] = []
        for part in parts:
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            else:
                merged.append(part)
        self._parts = tuple(merged)
        self.constant: str | None = None
        if all(isinstance(p, str) for p in merged):
            self.constant = "".join(merged)
            if has_ctl(self.constant):
                raise ConfigError(key, "the value contains CR, LF or NUL")
        self.uses_identity = "identity" in self.kinds

    def _kind(self, kind: str) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)

    def render(self, environ: Mapping[str, Any]) -> str | None:
        """The value for this request, or None when an identity claim is absent."""
        if self.constant is not None:
            return self.constant
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, FileSource):
                out.append(part.get())
            else:
                value = identity_value(environ.get(IDENTITY), part[1])
                if value is None:
                    return None
                # WSGI carries header bytes as latin-1 text: send the claim as
                # UTF-8, as the identity step does ("Đ" would not encode at all).
                out.append(value.encode("utf-8", "surrogatepass").decode("latin-1"))
        return "".join(out)

    def render_all(self, environ: Mapping[str, Any]) -> list[str] | None:
        """Like :meth:`render`, but a list claim (``${identity:groups}``) gives one value
        per element, in order, each with the template's other parts around it
        (``"oidc:${identity:groups}"`` -> ``oidc:sre``, ``oidc:dev``); two list
        claims give every combination. An empty list gives no value; None when
        a claim is absent."""
        if self.constant is not None:
            return [self.constant]
        values = [""]
        for part in self._parts:
            if isinstance(part, str):
                pieces = [part]
            elif isinstance(part, FileSource):
                pieces = [part.get()]
            else:
                found = identity_values(environ.get(IDENTITY), part[1])
                if found is None:
                    return None
                pieces = [v.encode("utf-8", "surrogatepass").decode("latin-1") for v in found]
            values = [v + p for v in values for p in pieces]
        return values

    def describe(self) -> str:
        return f"*** (from {', '.join(self.kinds) or 'literal'})"


def _raw_value(identity: Any, name: str) -> Any:
    if identity is None:
        return None
    if name in _IDENTITY_FIELDS:
        return getattr(identity, name, None)
    return identity.claims.get(name)


def identity_value(identity: Any, name: str) -> str | None:
    """A field (``email``, ``subject``, ``groups``...) or claim of the verified identity,
    as text; a list is joined with commas."""
    value = _raw_value(identity, name)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def identity_values(identity: Any, name: str) -> list[str] | None:
    """The same field or claim as a list of texts: one per element of a list, else one."""
    value = _raw_value(identity, name)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]
