"""Shared fixtures for the first-party plugins' tests.

Run them from the repository root (``pytest plugins/...``, or the README's
test command): they drive a real gunicorn through the core's ``tests.support``.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import no_secret_in_captured_logs, start_proxy, upstream

__all__ = ["no_secret_in_captured_logs", "start_proxy", "upstream"]

# A stand-in identity step, for tests only: it believes headers that a real
# identity step would have verified. The identity step itself is tested elsewhere.
_MODULE = "authproxy_test_steps"
_SOURCE = textwrap.dedent(
    '''
    from __future__ import annotations

    from authproxy.context import IDENTITY, VerifiedIdentity, refuse


    def header_identity(app, /):
        """Tests only: the identity is X-Test-User (an email) or X-Test-Service (a token)."""

        def step(environ, start_response):
            user = environ.pop("HTTP_X_TEST_USER", None)
            service = environ.pop("HTTP_X_TEST_SERVICE", None)
            if user:
                environ[IDENTITY] = VerifiedIdentity(subject="u-" + user, email=user)
            elif service:
                environ[IDENTITY] = VerifiedIdentity(subject="s-" + service, service_token=service)
            return app(environ, start_response)

        return step


    def header_refusal(app, /):
        """Tests only: refuse with 403 and the reason in X-Test-Refuse."""

        def step(environ, start_response):
            reason = environ.pop("HTTP_X_TEST_REFUSE", None)
            if reason:
                return refuse(environ, start_response, 403, reason)
            return app(environ, start_response)

        return step
    '''
)
_ENTRY_POINTS = f"""[authproxy.plugins]
test-identity = {_MODULE}:header_identity
test-refusal = {_MODULE}:header_refusal
"""


@pytest.fixture(scope="session")
def test_steps_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A path entry holding the ``test-identity`` and ``test-refusal`` steps, as a distribution."""
    root = tmp_path_factory.mktemp("test-steps")
    (root / f"{_MODULE}.py").write_text(_SOURCE)
    info = root / "authproxy_test_steps-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: authproxy-test-steps\nVersion: 0\n"
    )
    (info / "entry_points.txt").write_text(_ENTRY_POINTS)
    return root


@pytest.fixture
def test_steps(test_steps_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The test steps, visible in this process and, through the returned
    environment (pass it as ``env=`` to ``start_proxy``), in a proxy's."""
    monkeypatch.syspath_prepend(str(test_steps_path))
    prior = os.environ.get("PYTHONPATH")
    yield {"PYTHONPATH": os.pathsep.join(p for p in (str(test_steps_path), prior) if p)}
    sys.modules.pop(_MODULE, None)
