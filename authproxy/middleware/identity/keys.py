"""The signing keys of an identity-aware proxy: fetched, cached and kept fresh.

A :class:`KeyCache` holds the public keys published at one JWKS URL, by ``kid``.

- The first fetch happens when the cache is built (at start-up), never on the
  first request. If it fails, the cache starts empty and every lookup fails,
  so the identity step refuses everyone (fail closed) until a fetch succeeds.
- A daemon thread refetches every ``refresh_interval`` seconds, so a rotation
  is picked up without traffic. After a failure with no key at all it retries
  after 1 s, then 2, 4... up to ``min_refetch_interval``: the proxy serves (and
  ``/readyz`` answers 200) within a couple of seconds of the key endpoint
  coming back from a short outage. After a failure with a good set it retries
  every ``min_refetch_interval``.
- A lookup of an unknown ``kid`` triggers a refetch at once, but at most one
  per ``min_refetch_interval``: a flood of tokens with made-up kids costs the
  key endpoint one request per interval, not one per token.
- A failed fetch (error status, timeout, not JSON, no usable key) keeps the
  last good set: an outage of the key endpoint does not log anyone out.

Both formats are read: a plain JWKS (``{"keys": [...]}``) and Cloudflare
Access's certs document, which adds ``public_cert`` and ``public_certs`` (the
same keys as X.509 certificates) next to ``keys``; the JWKS part is used.
Keys are parsed by PyJWT (:class:`jwt.PyJWK`), one by one; a key is kept only if
it parses, is for signing and its algorithm is both asymmetric and in the
allow-list given, so an ``oct`` (HMAC) key published by mistake can never
verify anything and a malformed key does not take the good ones with it.

One cache per process, shared by every thread. After a fork the child starts
its own refresh thread and HTTP session on first use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping

import requests
import urllib3
from jwt import PyJWK

log = logging.getLogger("authproxy.keys")

#: The only algorithms a key is ever trusted for: public-key signatures.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

#: The first retry after a failed fetch left no key, in seconds; it doubles per failure.
_FIRST_RETRY = 1.0

#: A key set larger than this is not a key set.
MAX_DOCUMENT_BYTES = 1024 * 1024


class KeyFetchError(Exception):
    """One fetch of the key set failed; the message says why (never a secret)."""


def parse_key_set(data: bytes, algorithms: Iterable[str]) -> dict[str, PyJWK]:
    """The usable signing keys of a JWKS or Cloudflare certs document, by ``kid``.

    A key without a ``kid`` is stored under ``""``. Raises :class:`KeyFetchError`
    when the document is not a key set or holds no usable key.
    """
    allowed = frozenset(algorithms) & ASYMMETRIC_ALGORITHMS
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise KeyFetchError("the key set is not JSON") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise KeyFetchError('the key set has no "keys" list')
    keys: dict[str, PyJWK] = {}
    for entry in document["keys"]:
        # Key by key: one malformed key must not take the good ones with it, and
        # PyJWT raises more than PyJWTError on some (KeyError for an "oct" key
        # without "k", TypeError for a number where a string belongs...).
        try:
            key = PyJWK(entry)
        except Exception:
            continue
        kid = key.key_id
        if key.public_key_use not in (None, "sig") or key.algorithm_name not in allowed:
            continue
        if kid is not None and not isinstance(kid, str):
            continue
        keys[kid or ""] = key
    if not keys:
        raise KeyFetchError(f"the key set has no key for the algorithms {sorted(allowed)}")
    return keys


class KeyCache:
    """The keys published at *url*, refreshed in the background.

    :param url: where the key set is published (``https://``; ``http://`` is
        the caller's decision, the identity step allows it only for loopback).
    :param algorithms: the algorithms a key may be for; other keys are ignored.
    :param refresh_interval: seconds between scheduled refetches.
    :param min_refetch_interval: at least this many seconds between refetches
        caused by an unknown ``kid``, and the longest wait between retries after
        a failure (with no key at all they start at 1 s and double up to it).
    :param timeout: seconds one fetch may take in all (connect, headers, body).
    :param ca_bundle: a CA bundle to verify the key endpoint's TLS certificate
        against, instead of the system's.
    :param start: fetch now and start the refresh thread (off in some tests).

    Example::

        keys = KeyCache("https://myteam.cloudflareaccess.com/cdn-cgi/access/certs",
                        algorithms=["RS256"])
        key = keys.get(kid)          # a jwt.PyJWK, or None
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Iterable[str],
        refresh_interval: float = 3600.0,
        min_refetch_interval: float = 30.0,
        timeout: float = 5.0,
        ca_bundle: str | None = None,
        start: bool = True,
    ) -> None:
        self.url = url
        self.algorithms = tuple(algorithms)
        self.refresh_interval = refresh_interval
        self.min_refetch_interval = min_refetch_interval
        self.timeout = timeout
        self.ca_bundle = ca_bundle
        #: Bumped whenever a key that was trusted disappears from the set, so
        #: that results verified with it can be dropped.
        self.generation = 0
        self._keys: dict[str, PyJWK] = {}
        self._last_refetch = -math.inf
        self._retry_delay = self._first_retry()
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._session = self._new_session()
        if start:
            self.refresh()
            self._start_thread()

    # -- lookups (hot path) -------------------------------------------------

    def get(self, kid: str | None) -> PyJWK | None:
        """The trusted key with this ``kid``, or None.

        An unknown kid (or an empty cache) triggers a refetch unless one ran
        in the last ``min_refetch_interval`` seconds; concurrent callers wait
        for that one fetch instead of starting their own. A token without a
        kid matches only when the set holds exactly one key.
        """
        if self._pid != os.getpid():
            self._after_fork()
        key = self._lookup(self._keys, kid)
        if key is not None:
            return key
        self._refetch_for(kid)
        return self._lookup(self._keys, kid)

    @staticmethod
    def _lookup(keys: Mapping[str, PyJWK], kid: str | None) -> PyJWK | None:
        if kid is None:
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid) if kid else None

    def has_keys(self) -> bool:
        """True when at least one key is trusted (a readiness check)."""
        if self._pid != os.getpid():
            # A worker asked by /readyz before any token: start its refresh thread.
            self._after_fork()
        return bool(self._keys)

    def kids(self) -> list[str]:
        return sorted(self._keys)

    # -- fetching -----------------------------------------------------------

    def refresh(self) -> bool:
        """Fetch the key set now; True if it succeeded. Failures keep the last good set."""
        with self._lock:
            return self._fetch_locked()

    def _refetch_for(self, kid: str | None) -> None:
        with self._lock:
            if self._lookup(self._keys, kid) is not None:
                return  # another thread's fetch brought it
            now = time.monotonic()
            if now - self._last_refetch < self.min_refetch_interval:
                return
            self._last_refetch = now
            self._fetch_locked()

    def _fetch_locked(self) -> bool:
        try:
            keys = parse_key_set(self._download(), self.algorithms)
        except KeyFetchError as exc:
            self._failed(str(exc))
            return False
        except requests.RequestException as exc:
            self._failed(_describe_request_error(exc))
            return False
        old = self._keys
        if any(kid not in keys or keys[kid].key != key.key for kid, key in old.items()):
            self.generation += 1
        self._keys = keys
        if self._failing or not old:
            log.info("keys from %s: %s", self.url, ", ".join(sorted(keys)) or "(no kid)")
        elif keys.keys() != old.keys():
            log.info("keys from %s changed: now %s", self.url, ", ".join(sorted(keys)))
        self._failing = False
        return True

    def _failed(self, why: str) -> None:
        # The first failure of a run is a warning, repeats are debug noise.
        level = logging.DEBUG if self._failing else logging.WARNING
        if self._keys:
            log.log(
                level, "cannot fetch keys from %s: %s; keeping the last good set", self.url, why
            )
        else:
            log.log(
                level,
                "cannot fetch keys from %s: %s; no keys, refusing every request",
                self.url,
                why,
            )
        self._failing = True

    def _download(self) -> bytes:
        return fetch_document(self._session, self.url, self.timeout, KeyFetchError)

    def _new_session(self) -> requests.Session:
        return fetch_session(self.ca_bundle)

    # -- background refresh -------------------------------------------------

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="authproxy-keys", daemon=True)
        self._thread.start()

    def _first_retry(self) -> float:
        return min(_FIRST_RETRY, self.refresh_interval)

    def _next_delay(self, ok: bool) -> float:
        """Seconds to the next fetch: the schedule, or a retry after a failure."""
        if ok:
            self._retry_delay = self._first_retry()
            return self.refresh_interval
        # Never more than once a second (unless the schedule itself is faster).
        cap = min(self.refresh_interval, max(self.min_refetch_interval, _FIRST_RETRY))
        if self._keys:
            return cap  # the last good set serves meanwhile
        # No key, everyone refused: back off from 1 s, doubling up to the cap.
        delay = min(self._retry_delay, cap)
        self._retry_delay = min(delay * 2, cap)
        return delay

    def _run(self) -> None:
        delay = self._next_delay(bool(self._keys))
        while not self._stop.wait(delay):
            try:
                ok = self.refresh()
            except Exception:  # one bad fetch must never end the schedule
                log.exception("unexpected error fetching keys from %s", self.url)
                ok = False
            delay = self._next_delay(ok)

    def _after_fork(self) -> None:
        # Threads and sockets do not survive a fork: make fresh ones, once.
        with _fork_lock:
            if self._pid == os.getpid():
                return
            self._lock = threading.Lock()
            self._session = self._new_session()
            self._pid = os.getpid()
            if self._thread is not None and not self._stop.is_set():
                self._start_thread()

    def close(self) -> None:
        """Stop the refresh thread and close the HTTP session."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout + 1)
        self._session.close()

    def __repr__(self) -> str:
        return f"KeyCache({self.url!r}, kids={self.kids()!r})"


_fork_lock = threading.Lock()


def _describe_request_error(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__


def fetch_session(ca_bundle: str | None) -> requests.Session:
    """A session for the identity step's own fetches (keys, groups): no proxy
    from the environment, no ``.netrc``, no ``REQUESTS_CA_BUNDLE``; *ca_bundle*
    or the system's trust store."""
    session = requests.Session()
    session.trust_env = False
    session.verify = ca_bundle or True
    return session


def fetch_document(
    session: requests.Session,
    url: str,
    timeout: float,
    error: type[Exception],
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """GET a JSON document at *url*: a 200 within *timeout* seconds, whole, at
    most MAX_DOCUMENT_BYTES; anything else raises *error*."""
    deadline = time.monotonic() + timeout
    response = session.get(
        url,
        timeout=(timeout, timeout),
        stream=True,
        allow_redirects=False,
        headers={"Accept": "application/json", **(headers or {})},
    )
    with response:
        if response.status_code != 200:
            raise error(f"HTTP {response.status_code}")
        return read_bounded(response, deadline, timeout, error)


def read_bounded(
    response: requests.Response, deadline: float, timeout: float, error: type[Exception]
) -> bytes:
    """The body of a streamed *response*, at most MAX_DOCUMENT_BYTES, by *deadline*
    (``time.monotonic()``); any failure raises *error* saying why in a few words."""
    chunks: list[bytes] = []
    size = 0
    while True:
        # read1 returns what has arrived, so the deadline also bounds
        # an endpoint that trickles bytes.
        try:
            chunk = response.raw.read1(65536)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # Below requests: urllib3's own errors, a stall or a reset mid-body.
            if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
                raise error(f"timed out after {timeout}s") from None
            raise error(f"the answer broke off ({type(exc).__name__})") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            raise error(f"the answer is larger than {MAX_DOCUMENT_BYTES} bytes")
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout}s")
        chunks.append(chunk)
