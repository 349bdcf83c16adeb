"""describe(): the reason an upstream exchange failed, found through the wrappers."""

from __future__ import annotations

import socket
import ssl

import requests
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
)

from authproxy.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from authproxy.upstream.failures import describe


def wrapped(inner: BaseException, *outer: BaseException) -> BaseException:
    """*inner* raised and re-raised ``from`` each of *outer*, innermost first."""
    current = inner
    for wrapper in outer:
        wrapper.__cause__ = current
        current = wrapper
    return current


def test_dns_failure_through_requests_and_urllib3() -> None:
    conn = HTTPConnection("no-such-host.invalid", 80)
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    resolution = wrapped(gai, NameResolutionError("no-such-host.invalid", conn, gai))
    assert isinstance(resolution, NameResolutionError)
    exc = requests.ConnectionError(MaxRetryError(None, "/", resolution))  # type: ignore[arg-type]
    assert describe(exc) == "DNS lookup failed: Name or service not known"


def test_connect_timeout_is_not_a_read_timeout() -> None:
    conn = HTTPConnection("127.0.0.1", 80)
    exc = wrapped(TimeoutError("timed out"), ConnectTimeoutError(conn, "timed out"))
    assert describe(wrapped(exc, UpstreamTimeout("ConnectTimeoutError"))) == "connect timed out"
    read = wrapped(TimeoutError("timed out"), UpstreamTimeout("TimeoutError"))
    assert "waiting for the answer" in describe(read)


def test_refused_through_new_connection_error() -> None:
    conn = HTTPConnection("127.0.0.1", 1)
    refused = ConnectionRefusedError(111, "Connection refused")
    exc = wrapped(refused, NewConnectionError(conn, "Failed to establish a new connection"))
    assert describe(requests.ConnectionError(MaxRetryError(None, "/", exc))).startswith(  # type: ignore[arg-type]
        "connection refused"
    )


def test_certificate_problems_name_the_fix() -> None:
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_code = 18
    untrusted.verify_message = "self-signed certificate"
    text = describe(wrapped(untrusted, UpstreamConnectError("SSLCertVerificationError")))
    assert text.startswith("certificate verify failed: self-signed certificate;")
    assert 'tls_verify = "/path/ca.pem"' in text and "tls_verify = false" in text
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code = 62
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'x'."
    assert "[upstream] url" in describe(mismatch)


def test_a_protocol_error_says_what_it_says_and_unknowns_fall_back() -> None:
    assert describe(UpstreamProtocolError("malformed response")) == "malformed response"
    assert describe(requests.ConnectTimeout()) == "connect timed out"
    assert describe(RuntimeError()) == "RuntimeError"


def test_a_url_in_an_error_is_never_part_of_the_description() -> None:
    """urllib3's request errors carry the URL, whose query may hold a token."""
    exc = MaxRetryError(None, "/p?token=s3cret")  # type: ignore[arg-type]
    for wrapped_exc in (exc, requests.ConnectionError(exc)):
        text = describe(wrapped_exc)
        assert "s3cret" not in text and text == "MaxRetryError"
