"""One HTTP/1.1 request on a client connection, parsed and answered with gunicorn's code.

This module holds everything :mod:`authproxy.serve.worker` uses of gunicorn
beyond its worker interface (``gunicorn.workers.base.Worker``): the request
parser (:class:`~gunicorn.http.parser.RequestParser`, its ``unreader``'s
``unread`` and ``take_buffered``, ``finish_body``), the WSGI environ and
response (:func:`gunicorn.http.wsgi.create`, :class:`~gunicorn.http.wsgi.Response`:
``start_response``, ``write``, ``send_headers``, ``default_headers``,
``should_close``, ``force_close`` and its public fields) and the parser's
``NoMoreData``. No private name of gunicorn is used; ``tests/test_exchange.py``
pins each of these, so a gunicorn release that changes one fails there
first.

:func:`serve_request` runs in a pool thread. It answers ordinary requests
itself and hands back, for the worker's event loop, what would otherwise hold
the thread for a long time: a streamed body (:class:`Stream`) and an accepted
upgrade (:class:`Tunnel`).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from gunicorn.http import wsgi
from gunicorn.http.errors import NoMoreData
from gunicorn.http.parser import RequestParser

from ..context import close_body
from ..errors import UpstreamError

#: What a drained, unread request body may take before the connection is closed instead.
DRAIN_SECONDS = 1.0
_SPLICE = getattr(os, "splice", None)


@dataclass
class Keep:
    """Served; the connection stays open with these bytes already read of the next request."""

    buffered: bytes


@dataclass
class Stream:
    """A response whose head is sent and whose body the event loop relays from *feed*."""

    body: Any
    feed: Any
    chunked: bool
    #: False: close the connection after the body; else keep it, with these bytes.
    keep: bool
    buffered: bytes


@dataclass
class Tunnel:
    """An accepted upgrade for the event loop to relay
    (:class:`~authproxy.upstream.tunnel.TunnelBody`)."""

    body: Any
    tunnel: Any
    to_upstream: bytes


#: None: close the connection.
Outcome = Keep | Stream | Tunnel | None


def serve_request(
    worker: Any, sock: socket.socket, client: Any, server: Any, buffered: bytes, drain: bool = True
) -> Outcome:
    """Read one request (what the loop *buffered*, then the socket), run the app, answer.

    *worker* is the gunicorn worker: ``cfg``, ``wsgi``, ``alive``, ``log``,
    ``handle_error`` and ``body_timeout`` are used.
    """
    parser = RequestParser(worker.cfg, sock, client)
    if buffered:
        parser.unreader.unread(buffered)
    req = None
    try:
        req = next(parser)
        return _answer(worker, parser, req, sock, client, server, drain)
    except (NoMoreData, StopIteration):
        return None
    except ssl.SSLError as exc:
        if exc.args and exc.args[0] != ssl.SSL_ERROR_EOF:
            worker.handle_error(req, sock, client, exc)
        return None
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, None):
            worker.log.exception("Socket error processing request.")
        return None
    except Exception as exc:
        worker.handle_error(req, sock, client, exc)
        return None


def _answer(
    worker: Any,
    parser: Any,
    req: Any,
    sock: socket.socket,
    client: Any,
    server: Any,
    drain: bool,
) -> Outcome:
    resp, environ = wsgi.create(req, sock, client, server, worker.cfg, Response)
    environ["wsgi.multithread"] = True
    if not worker.alive or not worker.cfg.keepalive:
        resp.force_close()
    body: Any = worker.wsgi(environ, resp.start_response)
    handed = False
    try:
        if resp.status_code == 101:
            tunnel = getattr(body, "tunnel", None)
            if tunnel is not None:
                handed = True
                return Tunnel(body, tunnel, parser.unreader.take_buffered())
        feed = getattr(body, "feed", None)
        if feed is not None and _relayable(resp) and not _spliceable(body, resp, sock):
            # The request's body must be behind us before the loop takes the connection.
            keep = not resp.should_close() and (not drain or _finish(parser))
            resp.send_headers()
            handed = True
            buffered = parser.unreader.take_buffered() if keep else b""
            return Stream(body, feed, resp.chunked, keep, buffered)
        _write(resp, body, sock)
        resp.close()
    except Exception as exc:
        if not resp.headers_sent:
            raise
        # Mid-body: anything written now would be read as more of this body.
        if isinstance(exc, UpstreamError):
            worker.log.warning("upstream failed mid-body: %s", exc)
        elif not isinstance(exc, OSError):
            worker.log.exception("Error handling request")
        _close_now(sock)
        return None
    finally:
        if not handed:
            close_body(body)
    if resp.should_close() or drain and not _finish(parser):
        return None
    return Keep(parser.unreader.take_buffered())


class Response(wsgi.Response):  # type: ignore[misc]
    """gunicorn's HTTP/1 response, with its ``Date`` made once a second, not per answer."""

    def default_headers(self) -> list[str]:
        # gunicorn's own lines, but for the Date (formatted per call there).
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        major, minor = self.req.version
        lines = [
            f"HTTP/{major}.{minor} {self.status}\r\n",
            f"Server: {self.version}\r\n",
            f"Date: {_http_date()}\r\n",
            f"Connection: {connection}\r\n",
        ]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        return lines


_date: tuple[int, str] = (-1, "")


def _http_date() -> str:
    """``Sun, 06 Dec 2026 10:00:00 GMT``, made once a second."""
    global _date
    now = int(time.time())
    second, text = _date
    if second != now:
        text = formatdate(now, usegmt=True)
        _date = (now, text)
    return text


def _relayable(resp: Any) -> bool:
    """True for a response that has a body to relay (not for HEAD, 1xx, 204, 304)."""
    return (
        resp.req.method != "HEAD" and resp.status_code >= 200 and resp.status_code not in (204, 304)
    )


def _spliceable(body: Any, resp: Any, sock: socket.socket) -> bool:
    return getattr(body, "splice_to", None) is not None and _can_splice(resp, sock)


def _finish(parser: Any) -> bool:
    """Drain what the app left of the request body; False if that cannot be done quickly."""
    return bool(parser.finish_body(deadline=time.monotonic() + DRAIN_SECONDS))


def _write(resp: Any, body: Iterable[bytes], sock: socket.socket) -> None:
    """Write the answer: the head with the first piece in one send (one packet
    for a small answer, and no second write for Nagle's algorithm to hold
    back), a spliceable body socket to socket, the rest piece by piece."""
    splice_to: Callable[..., Iterable[int]] | None = getattr(body, "splice_to", None)
    if splice_to is not None and _can_splice(resp, sock):
        head = head_of(resp)
        try:
            moves = splice_to(sock, resp.response_length, head)
        except ValueError:
            pass  # the length the head announces is not the body's: iterate
        else:
            resp.headers_sent = True
            for moved in moves:
                resp.sent += moved
            return
    pieces = iter(body)
    for first in pieces:
        if resp.headers_sent or not _relayable(resp) or not isinstance(first, bytes):
            resp.write(first)
            break
        data = first
        if resp.response_length is not None:
            data = data[: resp.response_length]  # never more than the head announces
        framed = b"%X\r\n%b\r\n" % (len(data), data) if resp.chunked and data else data
        sock.sendall(head_of(resp) + framed)
        resp.headers_sent = True
        resp.sent = len(data)
        break
    for piece in pieces:
        resp.write(piece)


def head_of(resp: Any) -> bytes:
    """The response head gunicorn would send, as bytes: status line, its headers, the app's."""
    lines = resp.default_headers()
    lines.extend(f"{name}: {value}\r\n" for name, value in resp.headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _can_splice(resp: Any, sock: socket.socket) -> bool:
    return (
        _SPLICE is not None
        and type(sock) is socket.socket
        and resp.cfg.sendfile is not False
        and resp.response_length is not None
        and not resp.chunked
        and _relayable(resp)
    )


def _close_now(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
