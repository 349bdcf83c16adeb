"""Pins for what authproxy uses of urllib3 beyond its documented interface
(authproxy/upstream/pool.py): each test fails on a urllib3 version that changes it."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from authproxy.upstream.pool import new_connection, pool_maxsize

from .support import make_pki


def test_new_connection_is_unconnected_and_carries_the_pools_host_and_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, timeout=urllib3.Timeout(connect=2.5))
    try:
        conn = new_connection(pool)
        assert isinstance(conn, HTTPConnection)
        assert conn.sock is None  # the transport connects it itself
        assert (conn.host, conn.port, conn.timeout) == ("127.0.0.1", port, 2.5)
        assert pool.pool is not None and pool.pool.qsize() == 1  # its queue never saw it
        conn.connect()
        assert conn.sock is not None
        assert conn.sock.getpeername()[1] == port
        conn.close()
    finally:
        pool.close()
        listener.close()


def test_new_connection_of_an_https_pool_carries_its_tls_settings(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    pool = urllib3.HTTPSConnectionPool(
        "127.0.0.1",
        443,
        cert_reqs="CERT_REQUIRED",
        ca_certs=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    try:
        conn = new_connection(pool)
        assert isinstance(conn, HTTPSConnection)
        assert conn.sock is None
        assert conn.cert_reqs == "CERT_REQUIRED"
        assert conn.ca_certs == str(pki.ca)
        assert (conn.cert_file, conn.key_file) == (str(pki.client_cert), str(pki.client_key))
    finally:
        pool.close()


def test_a_new_https_connection_verifies_against_the_pools_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    context = pki.server_context()

    def serve() -> None:
        sock, _ = listener.accept()
        try:
            context.wrap_socket(sock, server_side=True).close()
        except (ssl.SSLError, OSError):
            sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pool = urllib3.HTTPSConnectionPool(
        "127.0.0.1", port, cert_reqs="CERT_REQUIRED", ca_certs=str(pki.ca)
    )
    try:
        conn = new_connection(pool)
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        conn.close()
    finally:
        thread.join(10)
        pool.close()
        listener.close()


def test_pool_maxsize_is_what_the_pool_was_built_with() -> None:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", 1, maxsize=7)
    try:
        assert pool_maxsize(pool) == 7
        assert pool.pool is not None
        pool.pool.get()  # a slot in use: the size it was built with is still 7
        assert pool_maxsize(pool) == 7
    finally:
        pool.close()
