"""Logging set-up shared by ``authproxy serve``, the gunicorn entry point and the demo.

Everything goes to stderr through :class:`~authproxy.secrets.RedactingFormatter`:
access lines as bare messages (one JSON object or combined line each), every
other line with time, level and logger name. Access lines are written in
batches by :class:`BatchingStreamHandler`, at most a tenth of a second late.
"""

from __future__ import annotations

import logging.config
import threading
import time
from collections import deque
from typing import Any, TextIO

_FORMATTER = "authproxy.secrets.RedactingFormatter"


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A :class:`logging.StreamHandler` that writes its lines in batches.

    A line is written at most *flush_interval* seconds after it was logged,
    together with the lines logged meanwhile, or at once when about
    *buffer_size* characters are waiting. One write per batch instead of one
    per line: at thousands of requests a second that is thousands of system
    calls (and GIL hand-offs) fewer. :meth:`flush`, which logging runs at
    interpreter exit, writes what is waiting; a process killed outright loses
    at most the last *flush_interval* of lines.

    Logging a line takes no lock (logging's handlers hold one around each
    line): the line is formatted by the calling thread and appended to a
    queue, and only the writes are serialised. Under a threaded server, a lock
    taken per request makes the threads queue up behind whichever of them the
    GIL interrupted while it held the lock.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        flush_interval: float = 0.1,
        buffer_size: int = 64 * 1024,
    ) -> None:
        super().__init__(stream)
        self.flush_interval = flush_interval
        self.buffer_size = buffer_size
        self._pending: deque[str] = deque()
        self._pending_size = 0  # approximate: updated without a lock
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None

    def handle(self, record: logging.LogRecord) -> Any:
        # logging.Handler.handle, minus the lock around emit.
        allowed = self.filter(record)
        if isinstance(allowed, logging.LogRecord):  # Python 3.12+: a filter may replace it
            record = allowed
        if allowed:
            self.emit(record)
        return allowed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)  # deque.append is atomic
        self._pending_size += len(line)
        if self._pending_size >= self.buffer_size:
            self.flush()
        elif not self._wake.is_set():  # the first line since the flusher last woke
            self._start_flusher()
            self._wake.set()

    def _start_flusher(self) -> None:
        flusher = self._flusher
        if flusher is not None and flusher.is_alive():
            return
        self.acquire()  # the first line ever, or the first in a forked child
        try:
            flusher = self._flusher
            if flusher is None or not flusher.is_alive():
                self._wake = threading.Event()
                flusher = threading.Thread(
                    target=self._run, name="authproxy-log-flusher", daemon=True
                )
                self._flusher = flusher
                flusher.start()
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        except Exception:
            # Like emit's failures: reported on stderr, never raised at the caller.
            self.handleError(logging.makeLogRecord({"msg": "(batched log lines)"}))
        finally:
            self.release()

    def _write_pending(self) -> None:
        # Writers hold self.lock; lines appended meanwhile go with the next batch.
        pending = self._pending
        count = len(pending)
        if not count:
            return
        data = "".join([pending.popleft() for _ in range(count)])
        self._pending_size = 0
        stream = self.stream
        stream.write(data)
        if hasattr(stream, "flush"):
            stream.flush()

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            wake.clear()  # a line logged from now on wakes it again
            time.sleep(self.flush_interval)
            self.flush()


def logconfig_dict(level: str = "info") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict; gunicorn takes it as ``logconfig_dict``."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {
                "()": _FORMATTER,
                "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
            },
            "message": {"()": _FORMATTER, "format": "%(message)s"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "authproxy.serve.logs.BatchingStreamHandler",
                "formatter": "message",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            "authproxy": {"level": level, "handlers": ["stderr"], "propagate": False},
            "authproxy.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            # The pipeline's access-log step writes the access log; gunicorn's
            # own would repeat it with the query string (tokens) in it.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }


def configure(level: str = "info") -> None:
    logging.config.dictConfig(logconfig_dict(level))
