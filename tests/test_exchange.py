"""What authproxy's worker uses of gunicorn beyond its worker interface, pinned.

Everything is in :mod:`authproxy.serve.exchange` (and ``base.Worker`` /
``ssl_wrap_socket`` in :mod:`authproxy.serve.worker`). A gunicorn release that
renames, removes or changes one of these fails here before anything else does;
the worker's behaviour tests (tests/test_worker.py and every test through
``authproxy serve``) then show whether the change matters.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any

import gunicorn
import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.errors import NoMoreData
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import Unreader
from gunicorn.sock import ssl_wrap_socket
from gunicorn.workers import base

from authproxy.serve import exchange


def test_the_gunicorn_release_is_one_the_worker_was_built_on() -> None:
    assert (27,) <= gunicorn.version_info[:1] < (28,)


@pytest.mark.parametrize(
    ("obj", "names"),
    [
        (base.Worker, ["init_process", "run", "notify", "handle_error", "ppid", "max_requests"]),
        (wsgi.Response, ["start_response", "write", "send_headers", "default_headers"]),
        (wsgi.Response, ["should_close", "force_close", "close"]),
        (Unreader, ["unread", "take_buffered"]),
        (RequestParser, ["finish_body"]),
    ],
)
def test_the_names_used_exist(obj: Any, names: list[str]) -> None:
    worker_attrs = {"ppid", "max_requests"}
    for name in names:
        if name in worker_attrs:
            assert name in inspect.getsource(base.Worker.__init__)
        else:
            assert callable(getattr(obj, name)), name


def test_the_signatures_used() -> None:
    assert list(inspect.signature(wsgi.create).parameters)[:5] == [
        "req",
        "sock",
        "client",
        "server",
        "cfg",
    ]
    assert list(inspect.signature(RequestParser).parameters) == ["cfg", "source", "source_addr"]
    assert "deadline" in inspect.signature(RequestParser.finish_body).parameters
    assert list(inspect.signature(ssl_wrap_socket).parameters) == ["sock", "conf"]
    assert issubclass(NoMoreData, Exception)
    assert isinstance(base.Worker.PIPE, list)  # the signal wake-up pipe, set up by init_process
    assert "response_class" in inspect.signature(wsgi.create).parameters


def test_a_request_parsed_from_buffered_bytes_and_answered_with_one_send() -> None:
    """The exchange end to end on a socket pair: gunicorn parses what the loop read,
    the answer goes out head and body together, the next request's bytes come back."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        cfg = Config()

        class FakeWorker:
            alive = True
            log = None
            body_timeout = 5.0

            def __init__(self) -> None:
                self.cfg = cfg

            @staticmethod
            def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
                assert environ["PATH_INFO"] == "/x"
                start_response("200 OK", [("Content-Length", "2")])
                return [b"hi"]

        ours.settimeout(5)
        outcome = exchange.serve_request(
            FakeWorker(),
            ours,
            ("127.0.0.1", 1),
            ("127.0.0.1", 2),
            b"GET /x HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\n",
        )
        assert isinstance(outcome, exchange.Keep)
        assert outcome.buffered == b"GET /next HTTP/1.1\r\n"
        answer = theirs.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhi")


def test_the_response_head_is_gunicorns_but_for_a_date_made_once_a_second() -> None:
    """authproxy's Response subclass writes the lines gunicorn's default_headers writes."""
    heads = {
        "counted": (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", [("Content-Length", "2")]),
        "chunked": (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", []),
        "closing": (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", []),
        "HTTP/1.0": (b"GET / HTTP/1.0\r\nHost: h\r\n\r\n", []),
    }
    ours, theirs = socket.socketpair()
    with ours, theirs:
        cfg = Config()
        for name, (request, headers) in heads.items():
            parser = RequestParser(cfg, iter([request]), ("h", 1))
            req = next(parser)
            mine = exchange.Response(req, ours, cfg)
            plain = wsgi.Response(req, ours, cfg)
            for resp in (mine, plain):
                resp.start_response("200 OK", list(headers))
            lines = [x for x in mine.default_headers() if not x.startswith("Date: ")]
            assert lines == [x for x in plain.default_headers() if not x.startswith("Date: ")], name
            assert any(line.startswith("Date: ") for line in mine.default_headers()), name
