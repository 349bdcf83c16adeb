"""read-only: an authproxy step that lets only named people change things."""

from __future__ import annotations

from authproxy.context import identity_of, refuse

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ReadOnly:
    """Refuse requests that change things (POST, PUT, ...) unless a writer sends them.

    :param writers: emails or service-token names that may change things.
    """

    def __init__(self, app, /, *, writers: list[str] | None = None):
        self.app = app
        self.writers = frozenset(writers or ())

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] not in SAFE_METHODS:
            identity = identity_of(environ)
            if identity is None or identity.name not in self.writers:
                return refuse(environ, start_response, 403, "read-only: not a writer")
        return self.app(environ, start_response)
