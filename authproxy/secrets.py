"""A process-wide registry of secret strings, and the log redaction that uses it.

Every middleware that handles a credential (the injected token, a client's JWT)
registers it here; :class:`RedactingFormatter` replaces any registered value
with ``***`` in every formatted log line, tracebacks included. This is a
safety net under the rule that secrets are never passed to a logger at all.
"""

from __future__ import annotations

import logging
import threading

REDACTED = "***"
# Values shorter than this are not registered: redacting "a" or "1" would
# garble every log line and protects nothing.
MIN_SECRET_LENGTH = 6

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secret(value: str) -> None:
    """Mark *value* as secret: it is redacted from every log line from now on."""
    global _secrets
    if not value or len(value) < MIN_SECRET_LENGTH or value in _secrets:
        return
    with _lock:
        if value not in _secrets:
            # Longest first, so a secret that contains another is redacted whole.
            _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True))


def registered_secrets() -> tuple[str, ...]:
    return _secrets


def redact(text: str) -> str:
    """Return *text* with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` that redacts registered secrets."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
