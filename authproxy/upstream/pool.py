"""What authproxy uses of urllib3 beyond its documented interface, in one place.

The upstream adapter (:mod:`authproxy.upstream.adapter`) takes its connection
pools from requests (``HTTPAdapter.get_connection_with_tls_context``), so TLS
verification, CA bundle and client certificate are configured as requests
configures them. It then keeps idle connections itself
(:class:`~authproxy.upstream.transport.IdleConnections`) and needs two things
urllib3 does not document:

* :func:`new_connection`: ``HTTPConnectionPool._new_conn()``, a new,
  unconnected connection with the pool's host, port and TLS settings;
* :func:`pool_maxsize`: ``HTTPConnectionPool.pool.maxsize``, the number of
  idle connections the pool was built to keep.

Each is pinned by a test (tests/test_pool.py) that fails on a urllib3 version
that changes it. Nothing else in authproxy touches a private urllib3 name.
"""

from __future__ import annotations

from typing import Any


def new_connection(pool: Any) -> Any:
    """A new connection from *pool* (its host, port, timeouts and TLS settings), not
    connected yet (``conn.sock is None``) and never seen by the pool's own queue."""
    return pool._new_conn()


def pool_maxsize(pool: Any) -> int:
    """How many idle connections *pool* was built to keep (``pool_maxsize``)."""
    maxsize: int = pool.pool.maxsize
    return maxsize
