"""Token buckets: the rate format, and the in-process backend."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from authproxy.errors import ConfigError

_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*\Z")


@dataclass(frozen=True)
class Rate:
    """A bucket of ``capacity`` tokens refilled at ``per_second``; one request takes one."""

    capacity: float
    per_second: float
    text: str


def parse_rate(text: str, burst: int | None, key: str) -> Rate:
    """``"60/minute"``: 60 requests a minute, in a burst of up to 60 (or *burst*)."""
    match = _RATE.match(text)
    if match is None or int(match[1]) < 1:
        raise ConfigError(
            key,
            f"expected a rate like '60/minute' (N per second, minute, hour or day), got {text!r}",
        )
    count = int(match[1])
    if burst is not None and burst < 1:
        raise ConfigError(key.replace("per_", "") + "_burst", f"expected at least 1, got {burst}")
    return Rate(float(burst or count), count / _UNITS[match[2]], text.strip())


class BackendError(Exception):
    """The backend could not be asked (e.g. Redis is down)."""


#: One request's claims: (bucket key, its rate). All or none take a token.
Claims = Sequence[tuple[str, Rate]]


class Buckets(Protocol):
    def take(self, claims: Claims) -> tuple[float, int]:
        """``(0.0, -1)`` when every bucket had a token (one is taken from each);
        else ``(seconds until it would have, index of the empty bucket)``, taking nothing."""

    def close(self) -> None: ...


class MemoryBuckets:
    """Buckets in this process's memory: exact within one process, so with N
    gunicorn workers a client may get up to N times the limit.

    At most *max_keys* buckets are kept; beyond that, full ones (idle clients)
    are dropped first, then the least recently used.
    """

    def __init__(
        self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, when, rate)
        self._state: dict[str, tuple[float, float, Rate]] = {}

    def take(self, claims: Claims) -> tuple[float, int]:
        now = self.clock()
        with self._lock:
            levels = []
            wait, empty = 0.0, -1
            for i, (key, rate) in enumerate(claims):
                tokens, when, _ = self._state.get(key, (rate.capacity, now, rate))
                tokens = min(rate.capacity, tokens + max(0.0, now - when) * rate.per_second)
                levels.append(tokens)
                if tokens < 1.0 and (1.0 - tokens) / rate.per_second > wait:
                    wait, empty = (1.0 - tokens) / rate.per_second, i
            if empty >= 0:
                return wait, empty
            for (key, rate), tokens in zip(claims, levels, strict=True):
                self._state.pop(key, None)  # re-insert: dict order is recency
                self._state[key] = (tokens - 1.0, now, rate)
            if len(self._state) > self.max_keys:
                self._prune(now)
        return 0.0, -1

    def _prune(self, now: float) -> None:
        full = [
            k
            for k, (tokens, when, rate) in self._state.items()
            if tokens + (now - when) * rate.per_second >= rate.capacity
        ]
        for key in full:
            del self._state[key]
        excess = len(self._state) - self.max_keys
        for key in list(self._state)[: max(0, excess)]:
            del self._state[key]

    def __len__(self) -> int:
        return len(self._state)

    def close(self) -> None:
        pass
