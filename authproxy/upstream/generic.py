"""What the forwarder needs of a response from a transport adapter other than authproxy's.

A :class:`requests.Session` given to the
:class:`~authproxy.upstream.forwarder.Forwarder` may mount any adapter for the
upstream: a plain :class:`requests.adapters.HTTPAdapter`, one of the user's
own, a test double (``responses``). Its :class:`requests.Response` is relayed
from ``raw`` (urllib3's ``HTTPResponse`` for requests' adapter): the header
fields as the upstream sent them, repeated ones (``Set-Cookie``) apart, never
as requests' merged ``response.headers``; the body undecoded
(``decode_content=False``: compressed bodies pass through byte-identical);
failures while reading it as authproxy's upstream errors, so that a body that
breaks off aborts the client connection instead of ending short.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import requests
import urllib3
from urllib3.exceptions import ReadTimeoutError

from ..errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout

#: What reading a body through requests or urllib3 may raise.
_READ_ERRORS = (
    urllib3.exceptions.HTTPError,
    requests.RequestException,
    http.client.HTTPException,
    OSError,
)


def header_fields(response: requests.Response) -> list[tuple[str, str]]:
    """The response's header fields, one pair per field line, repeated ones kept apart."""
    raw_headers = getattr(response.raw, "headers", None)
    if isinstance(raw_headers, urllib3.HTTPHeaderDict):
        return list(raw_headers.items())  # each value of a repeated field on its own
    return list(response.headers.items())


class GenericBody:
    """The body of a :class:`requests.Response`, undecoded, piece by piece as it comes.

    Read failures become :class:`~authproxy.errors.UpstreamTimeout` or
    :class:`~authproxy.errors.UpstreamProtocolError`; :meth:`close` closes the response.
    """

    __slots__ = ("_response", "_chunk_size")

    def __init__(self, response: requests.Response, chunk_size: int) -> None:
        self._response = response
        self._chunk_size = chunk_size

    def __iter__(self) -> Iterator[bytes]:
        raw: Any = self._response.raw
        try:
            if hasattr(raw, "stream"):
                pieces = raw.stream(self._chunk_size, decode_content=False)
            else:
                pieces = iter(lambda: raw.read(self._chunk_size), b"")
            for piece in pieces:
                if piece:
                    yield piece
        except UpstreamError:
            raise
        except _READ_ERRORS as exc:
            if isinstance(exc, (ReadTimeoutError, requests.Timeout, TimeoutError)):
                raise UpstreamTimeout("upstream stalled mid-body") from exc
            raise UpstreamProtocolError(f"upstream body failed: {type(exc).__name__}") from exc

    def close(self) -> None:
        self._response.close()
