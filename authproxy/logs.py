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
from typing import Any, TextIO

_FORMATTER = "authproxy.secrets.RedactingFormatter"


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A :class:`logging.StreamHandler` that writes its lines in batches.

    A line is written at most *flush_interval* seconds after it was logged,
    together with the lines logged meanwhile, or at once when *buffer_size*
    characters are waiting. One write per batch instead of one per line: at
    thousands of requests a second that is thousands of system calls (and GIL
    hand-offs) fewer. :meth:`flush`, which logging runs at interpreter exit,
    writes what is waiting; a process killed outright loses at most the last
    *flush_interval* of lines.
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
        self._pending: list[str] = []
        self._pending_size = 0
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Runs under self.lock (Handler.handle holds it).
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._pending_size += len(line)
        if self._pending_size >= self.buffer_size:
            self._write_pending()
        elif len(self._pending) == 1:
            flusher = self._flusher
            if flusher is None or not flusher.is_alive():  # first line, or a forked child
                self._wake = threading.Event()
                flusher = threading.Thread(
                    target=self._run, name="authproxy-log-flusher", daemon=True
                )
                self._flusher = flusher
                flusher.start()
            self._wake.set()

    def flush(self) -> None:
        self.acquire()
        try:
            self._wake.clear()
            self._write_pending()
        except Exception:
            # Like emit's failures: reported on stderr, never raised at the caller.
            self.handleError(logging.makeLogRecord({"msg": "(batched log lines)"}))
        finally:
            self.release()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        stream = self.stream
        stream.write(data)
        if hasattr(stream, "flush"):
            stream.flush()

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
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
                "class": "authproxy.logs.BatchingStreamHandler",
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
