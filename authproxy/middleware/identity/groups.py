"""A person's groups from Cloudflare Access's ``get-identity`` endpoint, fetched once per token.

Access application tokens name the person (``email``) but not their groups;
Access tells them at ``https://<team>.cloudflareaccess.com/cdn-cgi/access/get-identity``
to whoever presents the token as the ``CF_Authorization`` cookie. An
:class:`AccessGroups` asks there once per token and remembers the answer:

- The request carries that cookie and nothing else of the client's: no
  injected credential, no other cookie, no proxy or ``.netrc`` from the
  environment (``trust_env = False``), no cookie the endpoint set before (the
  session keeps none), no redirect followed.
- Answers are kept under the SHA-256 of the token (never the token itself)
  until the token's ``exp``, at most ``cache_size`` of them, least recently
  used dropped first.
- Single flight: a burst of requests with one new token makes one call; the
  others wait for its answer.
- A failure (refused, timed out, not 200, not JSON, no ``groups`` list, an
  answer about someone else) raises :class:`GroupsUnavailable`: the identity
  step refuses the request with ``503``. It is never taken to mean "no
  groups", and it is not remembered: the next request asks again.

Group names are the ``name`` field of each entry of ``groups``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.cookiejar
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import requests

from ... import __version__
from ...context import VerifiedIdentity
from .keys import fetch_document, fetch_session

log = logging.getLogger("authproxy.groups")


class GroupsUnavailable(Exception):
    """The groups could not be had; ``reason`` is for the log (never holds the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Flight:
    """One fetch under way, which other requests with the same token wait for."""

    __slots__ = ("done", "groups", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.groups: tuple[str, ...] | None = None
        self.error: str | None = None


class AccessGroups:
    """The groups of the person a verified Access token names.

    :param url: the ``get-identity`` endpoint (``https://``; the identity step
        allows ``http://`` only for loopback).
    :param timeout: seconds one fetch may take in all (connect, headers, body).
    :param cache_size: tokens whose groups are remembered (0: ask every time,
        still one call per burst).
    :param ca_bundle: a CA bundle for the endpoint's TLS, instead of the system's.

    Example::

        groups = AccessGroups("https://myteam.cloudflareaccess.com/cdn-cgi/access/get-identity")
        identity = groups.apply(token, identity)   # identity.groups filled in
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        cache_size: int = 4096,
        ca_bundle: str | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.cache_size = cache_size
        self.ca_bundle = ca_bundle
        self.fetches = 0
        self._lock = threading.Lock()
        #: digest -> (identity as verified, identity with groups, until)
        self._entries: OrderedDict[bytes, tuple[VerifiedIdentity, VerifiedIdentity, float]] = (
            OrderedDict()
        )
        self._flights: dict[bytes, _Flight] = {}
        self._pid = os.getpid()
        self._session = self._new_session()

    def apply(self, token: str, identity: VerifiedIdentity) -> VerifiedIdentity:
        """*identity* with its ``groups`` from Access; raises :class:`GroupsUnavailable`."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        # A hit takes no lock (as the token cache): each OrderedDict call is atomic.
        entry = self._entries.get(digest)
        if entry is not None and time.time() < entry[2]:
            try:
                self._entries.move_to_end(digest)
            except KeyError:  # evicted meanwhile by another thread
                pass
            if entry[0] is identity:
                return entry[1]
            return dataclasses.replace(identity, groups=entry[1].groups)
        with self._lock:
            flight = self._flights.get(digest)
            leader = flight is None
            if flight is None:
                flight = self._flights[digest] = _Flight()
        if leader:
            try:
                groups = self._fetch(token, identity)
                enriched = dataclasses.replace(identity, groups=groups)
                # Kept before the followers wake, so that no request in between
                # finds neither an answer nor a fetch under way and asks again.
                self._put(digest, identity, enriched)
                flight.groups = groups
            except GroupsUnavailable as exc:
                flight.error = exc.reason
                log.warning("cannot fetch groups from %s: %s", self.url, exc.reason)
            except Exception as exc:  # never leave the followers waiting
                flight.error = f"unexpected {type(exc).__name__}"
                log.exception("unexpected error fetching groups from %s", self.url)
            finally:
                with self._lock:
                    self._flights.pop(digest, None)
                flight.done.set()
        # The leader's fetch is bounded (connect, then the answer): never wait longer.
        elif not flight.done.wait(2 * self.timeout + 1.0):
            raise GroupsUnavailable(f"timed out after {self.timeout}s (waiting on another request)")
        if flight.groups is None:
            raise GroupsUnavailable(flight.error or "no answer")
        return dataclasses.replace(identity, groups=flight.groups)

    def _put(self, digest: bytes, identity: VerifiedIdentity, enriched: VerifiedIdentity) -> None:
        if self.cache_size <= 0:
            return
        exp = identity.claims.get("exp")
        if not isinstance(exp, (int, float)):
            return
        with self._lock:
            self._entries[digest] = (identity, enriched, float(exp))
            self._entries.move_to_end(digest)
            while len(self._entries) > self.cache_size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    # -- fetching ------------------------------------------------------------

    def _fetch(self, token: str, identity: VerifiedIdentity) -> tuple[str, ...]:
        self.fetches += 1
        try:
            document = json.loads(self._download(token))
        except (ValueError, UnicodeDecodeError):
            raise GroupsUnavailable("the answer is not JSON") from None
        except requests.RequestException as exc:
            raise GroupsUnavailable(_describe_request_error(exc)) from None
        return _groups_of(document, identity)

    def _download(self, token: str) -> bytes:
        if self._pid != os.getpid():
            self._after_fork()
        headers = {
            # The body is read as the bytes come: ask for no coding.
            "Accept-Encoding": "identity",
            "Cookie": f"CF_Authorization={token}",
        }
        return fetch_document(self._session, self.url, self.timeout, GroupsUnavailable, headers)

    def _new_session(self) -> requests.Session:
        session = fetch_session(self.ca_bundle)
        session.max_redirects = 0
        # One person's answer must never set a cookie that goes with the next one's.
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        # None of requests' defaults (Accept-Encoding, Connection...): only what
        # _download sends.
        session.headers.clear()
        session.headers["User-Agent"] = f"authproxy/{__version__}"
        return session

    def _after_fork(self) -> None:
        # Sockets and locks do not survive a fork: make fresh ones, once.
        with _fork_lock:
            if self._pid == os.getpid():
                return
            self._lock = threading.Lock()
            self._flights = {}
            self._session = self._new_session()
            self._pid = os.getpid()

    def close(self) -> None:
        self._session.close()

    def describe(self) -> str:
        return f"from {self.url} (once per token, up to {self.cache_size} kept)"


_fork_lock = threading.Lock()


def _groups_of(document: Any, identity: VerifiedIdentity) -> tuple[str, ...]:
    """The group names of a ``get-identity`` answer about *identity*."""
    if not isinstance(document, Mapping):
        raise GroupsUnavailable("the answer is not a JSON object")
    email = document.get("email")
    # The endpoint answers for the cookie it got; an answer about someone else
    # (a misrouted or caching middlebox) must not hand out their groups.
    if identity.email and (not isinstance(email, str) or email.lower() != identity.email.lower()):
        raise GroupsUnavailable("the answer is about another identity")
    groups = document.get("groups", [])
    if not isinstance(groups, list):
        raise GroupsUnavailable('the answer\'s "groups" is not a list')
    names = []
    for group in groups:
        name = group.get("name") if isinstance(group, Mapping) else group
        if not isinstance(name, str) or not name:
            raise GroupsUnavailable('a group in the answer has no "name"')
        names.append(name)
    return tuple(names)


def _describe_request_error(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__
