"""Tell a Kubernetes upstream to act as the verified person: ``Impersonate-User``,
``Impersonate-Group``, ``Impersonate-Uid`` and ``Impersonate-Extra-*`` from the identity."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..context import IDENTITY, VerifiedIdentity, add_upstream_header, refuse
from ..errors import ConfigError
from ..headers import has_ctl
from .templates import Template

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("authproxy.impersonate")

DEFAULT_USER = "${identity:email}"
DEFAULT_GROUPS = ("${identity:groups}",)
_IMPERSONATE_PREFIX = "HTTP_IMPERSONATE_"
# RFC 9110 token characters but "%", which starts an escape: what the API server
# reads as is in an Impersonate-Extra- key (its escapeExtraKey keeps the same set).
_KEY_SAFE = re.compile(r"[A-Za-z0-9!#$&'*+\-.^_`|~]")
#: Template sources shown as written by check-config: they are no secret.
_SHOWN_KINDS = frozenset({"literal", "identity"})


def extra_header(key: Any, where: str) -> str:
    """The header for the extra *key*: ``Impersonate-Extra-`` and the key, lower-case,
    with every byte that is not an HTTP token character percent-encoded
    (``acme.com/project`` -> ``Impersonate-Extra-acme.com%2Fproject``), as the
    Kubernetes API server reads it (it lower-cases, then unescapes)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(where, f"expected a non-empty extra name, got {key!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigError(where, f"an extra name holds a control character: {key!r}")
    if key != key.lower():
        raise ConfigError(
            where,
            f"extra names are lower-case (the API server lower-cases them): use {key.lower()!r}",
        )
    encoded = "".join(
        c if _KEY_SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode("utf-8"))
        for c in key
    )
    return "Impersonate-Extra-" + encoded


class Impersonate:
    """Send the verified identity upstream as Kubernetes impersonation headers.

    The Kubernetes dashboard (and the API server behind it) then acts as the
    person, with their own RBAC rights, instead of with the injected service
    account's; the API server's audit log names them (``impersonatedUser``).
    The injected token needs only the ``impersonate`` verb
    (``examples/kubernetes-dashboard/impersonation/``).

    Each option is a template (``${identity:...}``, ``${env:...}``, literal
    text). One that names a list (``${identity:groups}``) gives one header line
    per element, in order; an empty list gives none. Per request:

    - With a verified identity: exactly one ``Impersonate-User`` (empty or
      absent: ``403``, never the service account's own rights), then the
      ``Impersonate-Group`` lines, ``Impersonate-Uid`` (when it renders), and
      the ``Impersonate-Extra-<key>`` lines. A value with CR, LF or NUL refuses
      the request with ``403`` and a log line naming the header.
    - Without one (a ``skip_paths`` request, or no identity step ran):
      ``403`` while *require_identity* is true; with false, no
      ``Impersonate-*`` header is sent and the upstream acts with the injected
      credential's own rights.

    ``Impersonate-*`` headers from the client are removed at the edge; this
    step removes any left in the environ too, so what it sends is all the
    upstream sees. The lines travel to the forwarder under
    ``authproxy.extra_headers`` (one environ key cannot hold a repeated header).
    The pipeline refuses a config that lists this step without ``identity``
    before it.

    :param user: ``Impersonate-User``; default ``${identity:email}``, and, for
        a service token (no email), the token's name.
    :param groups: templates for ``Impersonate-Group``; default
        ``["${identity:groups}"]``: every group of the person (the identity
        step's ``groups`` option says where they come from). ``[]``: none.
    :param extra: extra name -> template, sent as ``Impersonate-Extra-<name>``
        (lower-case; characters that are not HTTP token characters are
        percent-encoded, as Kubernetes expects).
    :param uid: ``Impersonate-Uid``; empty (default): not sent.
    :param require_identity: refuse requests without a verified identity (``403``).

    Example::

        app = Impersonate(app, groups=["${identity:groups}", "dashboard-users"])
    """

    #: Steps that must come before this one in a pipeline (checked by the builder).
    authproxy_after = ("identity",)

    def __init__(
        self,
        app: WSGIApplication,
        *,
        user: str = DEFAULT_USER,
        groups: list[str] | tuple[str, ...] = DEFAULT_GROUPS,
        extra: dict[str, str] | None = None,
        uid: str = "",
        require_identity: bool = True,
    ) -> None:
        if not isinstance(require_identity, bool):
            raise ConfigError(
                "require_identity", f"expected true or false, got {require_identity!r}"
            )
        if isinstance(groups, str) or not isinstance(groups, (list, tuple)):
            raise ConfigError("groups", f"expected a list of templates, got {groups!r}")
        if extra is not None and not isinstance(extra, Mapping):
            raise ConfigError("extra", f"expected a table of name = template, got {extra!r}")
        if not isinstance(user, str) or not user:
            raise ConfigError("user", f"expected a template, got {user!r}")
        if not isinstance(uid, str):
            raise ConfigError("uid", f"expected a template, got {uid!r}")
        self.app = app
        self.require_identity = require_identity
        self.user = Template(user, key="user")
        self._service_token_fallback = user == DEFAULT_USER
        self.groups = tuple(Template(g, key=f"groups[{i}]") for i, g in enumerate(groups))
        self.uid = Template(uid, key="uid") if uid else None
        self.extra = tuple(
            (extra_header(k, f"extra.{k}"), Template(v, key=f"extra.{k}"))
            for k, v in (extra or {}).items()
        )
        names = [name.lower() for name, _ in self.extra]
        if len(set(names)) != len(names):
            raise ConfigError("extra", "two extra names give the same header")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        for key in [k for k in environ if k.startswith(_IMPERSONATE_PREFIX)]:
            del environ[key]
        identity = environ.get(IDENTITY)
        if not isinstance(identity, VerifiedIdentity):
            if self.require_identity:
                return refuse(environ, start_response, 403, "impersonate: no verified identity")
            return self.app(environ, start_response)
        lines = self._lines(environ, identity)
        if isinstance(lines, str):
            log.warning("impersonate: %s; request refused", lines)
            return refuse(environ, start_response, 403, f"impersonate: {lines}")
        for name, value in lines:
            add_upstream_header(environ, name, value)
        return self.app(environ, start_response)

    def _lines(
        self, environ: WSGIEnvironment, identity: VerifiedIdentity
    ) -> list[tuple[str, str]] | str:
        """The header lines for this identity, or why there can be none."""
        user = self.user.render(environ)
        if not user and self._service_token_fallback and identity.service_token:
            user = identity.service_token.encode("utf-8", "surrogatepass").decode("latin-1")
        if not user:
            return "the user template renders empty for this identity"
        if has_ctl(user):
            return "Impersonate-User would hold CR, LF or NUL"
        lines = [("Impersonate-User", user)]
        for template in self.groups:
            for value in template.render_all(environ) or ():
                if has_ctl(value):
                    return "Impersonate-Group would hold CR, LF or NUL"
                if value:
                    lines.append(("Impersonate-Group", value))
        if self.uid is not None:
            uid = self.uid.render(environ)
            if uid and has_ctl(uid):
                return "Impersonate-Uid would hold CR, LF or NUL"
            if uid:
                lines.append(("Impersonate-Uid", uid))
        for name, template in self.extra:
            for value in template.render_all(environ) or ():
                if has_ctl(value):
                    return f"{name} would hold CR, LF or NUL"
                lines.append((name, value))
        return lines

    def describe(self) -> dict[str, Any]:
        """The options, for ``check-config``: identity templates as written, others redacted."""
        return {
            "user": _shown(self.user),
            "groups": [_shown(t) for t in self.groups],
            "uid": _shown(self.uid) if self.uid is not None else "",
            "extra": {name: _shown(t) for name, t in self.extra},
            "require_identity": self.require_identity,
        }


def _shown(template: Template) -> str:
    if _SHOWN_KINDS.issuperset(template.kinds):
        return template.source
    return template.describe()
