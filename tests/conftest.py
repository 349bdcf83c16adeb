from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, settings

from authproxy.secrets import registered_secrets

from .jwks import AUDIENCE, TEAM_DOMAIN, SigningKey
from .support import TOKEN, Proxy, Upstream

# For every property test, loaded before any test module: properties, not
# timings, so no deadline on a loaded machine.
settings.register_profile(
    "authproxy", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("authproxy")


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., Proxy]]:
    """Start ``authproxy serve`` (real gunicorn); stopped, and its log checked
    for the injected token, when the test ends."""
    started: list[Proxy] = []

    def start(config: dict[str, Any] | None = None, **kwargs: Any) -> Proxy:
        proxy = Proxy(config, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
        logs = proxy.logs()
        assert TOKEN not in logs, "the injected token reached the proxy's log"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The RSA key the test module's key endpoint publishes."""
    return SigningKey("RSA")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    """A real RSA key that the key endpoint does not publish (until a test rotates to it)."""
    return SigningKey("RSA")


def bearer_config(upstream: Upstream, **upstream_options: Any) -> dict[str, Any]:
    """The usual test stack: JSON access log and the test token injected."""
    return {
        "upstream": {"url": upstream.url, **upstream_options},
        "pipeline": [
            {"use": "access-log", "format": "json"},
            {"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}},
        ],
    }


class Served(Protocol):
    @property
    def url(self) -> str: ...


def identity_config(
    upstream: Served, certs_url: str, *, then: Sequence[dict[str, Any]] = (), **identity: Any
) -> dict[str, Any]:
    """access-log -> identity (options *identity*) -> the steps *then* -> inject-headers
    (the test token) -> upstream; the identity step trusts tests/jwks.py's team and
    audience, with its keys from *certs_url*."""
    return {
        "upstream": {"url": upstream.url},
        "pipeline": [
            {"use": "access-log", "format": "json"},
            {
                "use": "identity",
                "team_domain": TEAM_DOMAIN,
                "audience": [AUDIENCE],
                "certs_url": certs_url,
                **identity,
            },
            *then,
            {"use": "inject-headers", "set": {"Authorization": f"Bearer {TOKEN}"}},
        ],
    }


@pytest.fixture(autouse=True)
def no_secret_in_captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail any test whose in-process log records contain a registered secret."""
    caplog.set_level(logging.DEBUG)
    yield
    secrets = {TOKEN, *registered_secrets()}
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_text:
            text += record.exc_text
        for secret in secrets:
            assert secret not in text, f"a secret reached the log: {record.name}"
