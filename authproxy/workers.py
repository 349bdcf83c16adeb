"""The gunicorn worker ``authproxy serve`` runs for ``worker_class = "gthread"``."""

from __future__ import annotations

import time

from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker


class ThreadWorker(_GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, with a heartbeat that costs nothing per request.

    gunicorn's worker touches its heartbeat file (a ``utime`` system call) on
    every turn of its event loop, which under load is every request or two.
    The arbiter only needs to hear from a worker within ``timeout`` seconds:
    this one touches the file at most every quarter of that, and at least once
    a second.
    """

    _last_notify = float("-inf")

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._last_notify >= min(1.0, self.timeout / 4):
            self._last_notify = now
            super().notify()
