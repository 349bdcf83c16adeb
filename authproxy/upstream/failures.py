"""Why an upstream exchange failed, in words an operator can act on.

A failed exchange reaches the forwarder wrapped two or three times (requests'
``ConnectionError`` around urllib3's ``MaxRetryError`` around
``NewConnectionError`` around ``ConnectionRefusedError``, or authproxy's
:class:`~authproxy.errors.UpstreamConnectError` around an
:class:`ssl.SSLCertVerificationError`). :func:`describe` looks through the
wrappers for the cause and names it: refused, timed out, DNS failure,
certificate not trusted or not for this host (with the setting that fixes it),
TLS handshake failure, reset. The client only ever sees a generic 502 or 504;
this text is for the log.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator

from requests.exceptions import ConnectTimeout, RequestException, Timeout

from ..errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout

#: The fix for an upstream certificate this machine does not trust.
UNTRUSTED_FIX = (
    'trust it with [upstream] tls_verify = "/path/ca.pem" (the CA that signed it, or the '
    "certificate itself if self-signed), or turn verification off with tls_verify = false"
)
#: The fix for a certificate that does not name the host in the upstream's URL.
MISMATCH_FIX = (
    "use a host name the certificate carries in [upstream] url, "
    "or turn verification off with tls_verify = false"
)
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH.
_MISMATCH_CODES = frozenset({62, 64})
_WRAPPERS = (UpstreamConnectError, UpstreamTimeout, RequestException)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """*exc* and everything it wraps: ``__cause__``, ``__context__``, urllib3's
    ``reason`` and exceptions passed as arguments (requests wraps that way), once each."""
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        reason = getattr(current, "reason", None)
        for inner in (current.__cause__, current.__context__, reason, *current.args):
            if isinstance(inner, BaseException):
                queue.append(inner)


def describe(exc: BaseException) -> str:
    """What went wrong with the upstream, from the cause that says it best."""
    found = list(causes(exc))
    # The wrappers (authproxy's, requests') say less than what they wrap.
    inner = [c for c in found if not isinstance(c, _WRAPPERS)]
    for describer in _DESCRIBERS:
        for cause in inner:
            text = describer(cause)
            if text:
                return text
    for cause in found:  # nothing inside: requests' exception type is all there is
        if isinstance(cause, ConnectTimeout):
            return "connect timed out"
        if isinstance(cause, Timeout):
            return "timed out waiting for the answer (read_timeout)"
    innermost = found[-1]
    if getattr(innermost, "url", None) is not None:
        # urllib3's request errors (MaxRetryError...) name the URL, query and all.
        return type(innermost).__name__
    return str(innermost) or type(innermost).__name__


def _certificate(exc: BaseException) -> str | None:
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return None
    message = getattr(exc, "verify_message", None) or str(exc)
    code = getattr(exc, "verify_code", None)
    if code in _MISMATCH_CODES or "match" in message.lower():
        return f"certificate verify failed: {message.rstrip('.')}; {MISMATCH_FIX}"
    return f"certificate verify failed: {message.rstrip('.')}; {UNTRUSTED_FIX}"


def _tls(exc: BaseException) -> str | None:
    if not isinstance(exc, ssl.SSLError):
        return None
    reason = getattr(exc, "reason", None) or str(exc)
    if "WRONG_VERSION_NUMBER" in str(reason).upper():
        return (
            f"TLS handshake failed ({reason}): the upstream does not speak TLS on this port; "
            "http:// instead of https:// in [upstream] url?"
        )
    return f"TLS handshake failed: {reason}"


def _refused(exc: BaseException) -> str | None:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening on that port?)"
    return None


def _dns(exc: BaseException) -> str | None:
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed: {exc.strerror or exc}"
    return None


def _timeout(exc: BaseException) -> str | None:
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError

    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        return "connect timed out"
    # BlockingIOError: a kernel receive timeout (see transport._set_timeouts).
    if isinstance(exc, (TimeoutError, BlockingIOError, ReadTimeoutError)):
        return "timed out waiting for the answer (read_timeout)"
    return None


def _os(exc: BaseException) -> str | None:
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror[:1].lower() + exc.strerror[1:]
        if exc.args and isinstance(exc.args[0], str):
            return exc.args[0]
    return None


def _protocol(exc: BaseException) -> str | None:
    return str(exc) if isinstance(exc, UpstreamProtocolError) else None


# Most specific first: an SSLError is an OSError, a refusal an OSError, a
# timeout an OSError too.
_DESCRIBERS: tuple[Callable[[BaseException], str | None], ...] = (
    _certificate,
    _tls,
    _refused,
    _dns,
    _timeout,
    _protocol,
    _os,
)
