"""Exceptions raised by authproxy.

::

    AuthproxyError
     +-- ConfigError                  bad configuration; names the key (exit non-zero)
     |    +-- PluginError             unknown plugin, bad option, name clash
     +-- UpstreamError                the upstream could not be used -> 502
          +-- UpstreamConnectError    refused, unreachable, TLS failure -> 502
          +-- UpstreamTimeout         connect or read timed out -> 504
          +-- UpstreamProtocolError   malformed or truncated answer -> 502
"""

from __future__ import annotations


class AuthproxyError(Exception):
    """Base class of every error authproxy raises on purpose."""


class ConfigError(AuthproxyError, ValueError):
    """The configuration is wrong. ``key`` names where, e.g. ``upstream.url``."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class PluginError(ConfigError):
    """A pipeline step cannot be loaded or its options do not fit."""


class UpstreamError(AuthproxyError):
    """The upstream could not be used. Maps to ``502 Bad Gateway``."""

    status = "502 Bad Gateway"


class UpstreamConnectError(UpstreamError, ConnectionError):
    """No connection to the upstream (refused, unreachable, TLS failure)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not connect or answer in time. Maps to ``504``."""

    status = "504 Gateway Timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not valid HTTP, or stopped short."""
