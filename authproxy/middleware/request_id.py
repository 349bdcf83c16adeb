"""Give every request an id, shared with the upstream, the client and the log."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..context import REQUEST_ID
from ..headers import environ_key

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# What an id from outside may look like: what log tools and other proxies make
# (UUIDs, hex, Cloudflare's Ray ids, base64url), and nothing that can break a log line.
_SANE_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}\Z")


def new_request_id() -> str:
    # An id names a request, it guards nothing: the random module (reseeded in
    # every forked worker) is enough, and spares a getrandom call per request.
    return f"{random.getrandbits(128):032x}"


class RequestId:
    """Reuse a sane incoming request id, or make one.

    The id is put in ``environ["authproxy.request_id"]``, sent upstream and
    returned to the client in the same header.

    :param header: the header that carries it.
    :param trust_incoming: reuse the client's id when it is sane (1-128 characters
        of letters, digits and ``._:+/=-``); otherwise, or when off, a new one is made.

    Example::

        app = RequestId(app, header="X-Request-ID")
    """

    def __init__(
        self, app: WSGIApplication, *, header: str = "X-Request-ID", trust_incoming: bool = True
    ) -> None:
        self.app = app
        self.header = header
        self.trust_incoming = trust_incoming
        self._key = environ_key(header)
        self._lower = header.lower()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        incoming = environ.get(self._key)
        if self.trust_incoming and incoming is not None and _SANE_ID.match(incoming):
            request_id = incoming
        else:
            request_id = new_request_id()
        environ[REQUEST_ID] = request_id
        environ[self._key] = request_id
        header, lower = self.header, self._lower

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers = [h for h in headers if h[0].lower() != lower]
            headers.append((header, request_id))
            return start_response(status, headers, exc_info)

        return self.app(environ, start)
