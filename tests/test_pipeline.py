"""The pipeline builder and the public API, driven by werkzeug's test client
with the real recording upstream behind."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from werkzeug.test import Client, EnvironBuilder

import authproxy
from authproxy import AccessLog, CrossOrigin, Forwarder, InjectHeaders, Pipeline, build_app
from authproxy.config import from_environment, from_mapping
from authproxy.pipeline import _Guard

from .support import TOKEN, Upstream, free_port

BEARER = f"Bearer {TOKEN}"


def stack(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstream": {"url": upstream.url},
        "pipeline": [
            {"use": "access-log", "format": "json"},
            {"use": "inject-headers", "set": {"Authorization": BEARER}},
        ],
    }
    config.update(extra)
    return config


@pytest.fixture
def app(upstream: Upstream) -> Iterator[Pipeline]:
    pipeline = build_app(stack(upstream))
    yield pipeline
    pipeline.close()


def test_public_api_is_importable() -> None:
    for name in ("Forwarder", "InjectHeaders", "AccessLog", "build_app", "Pipeline", "Health"):
        assert callable(getattr(authproxy, name))
    assert set(authproxy.__all__) >= {"Forwarder", "InjectHeaders", "AccessLog", "build_app"}


def test_steps_in_config_order_with_the_forwarder_at_the_core(
    app: Pipeline, upstream: Upstream
) -> None:
    # cross-origin is added after the access log, before anything that injects.
    assert [name for name, _ in app.steps] == ["access-log", "cross-origin", "inject-headers"]
    assert isinstance(app.steps[0][1], AccessLog)
    assert isinstance(app.steps[1][1], CrossOrigin)
    assert isinstance(app.steps[2][1], InjectHeaders)
    assert isinstance(app.forwarder, Forwarder)
    assert app.forwarder.url == upstream.url


def test_build_app_takes_a_config_or_a_mapping(upstream: Upstream) -> None:
    for config in (stack(upstream), from_mapping(stack(upstream))):
        pipeline = build_app(config)
        try:
            assert Client(pipeline).get("/").status_code == 200
        finally:
            pipeline.close()


def test_connection_header_is_stripped_before_any_step_injects(
    app: Pipeline, upstream: Upstream
) -> None:
    response = Client(app).get(
        "/",
        headers={"Connection": "Authorization, X-Request-ID", "Authorization": "Basic Y2xpZW50"},
    )
    assert response.status_code == 200
    seen = upstream.last()
    assert seen.header("Authorization") == BEARER
    assert seen.header("X-Request-Id") == response.headers["X-Request-ID"]


def test_client_impersonation_is_stripped_but_configured_injection_stays(
    upstream: Upstream,
) -> None:
    config = stack(upstream)
    config["pipeline"][1]["set"]["Impersonate-User"] = "dashboard-viewer"
    pipeline = build_app(config)
    try:
        Client(pipeline).get("/", headers={"Impersonate-User": "admin", "Impersonate-Group": "g"})
    finally:
        pipeline.close()
    assert upstream.last().header("Impersonate-User") == "dashboard-viewer"
    assert upstream.last().header("Impersonate-Group") is None


def test_health_is_answered_before_the_pipeline(app: Pipeline, upstream: Upstream) -> None:
    client = Client(app)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert upstream.seen == []


def test_health_paths_follow_the_config(upstream: Upstream) -> None:
    pipeline = build_app(stack(upstream, health={"live": "/alive", "ready": "/ready"}))
    try:
        client = Client(pipeline)
        assert client.get("/alive").data == b"ok\n"
        assert client.get("/ready").data == b"ok\n"
        client.get("/healthz")
        assert [s.target for s in upstream.seen] == ["/healthz"]
    finally:
        pipeline.close()


def test_readyz_reports_an_unreachable_upstream() -> None:
    pipeline = build_app({"upstream": {"url": f"http://127.0.0.1:{free_port()}"}})
    try:
        ready = Client(pipeline).get("/readyz")
        assert (ready.status_code, ready.data) == (503, b"not ready\n")
        assert Client(pipeline).get("/healthz").status_code == 200
    finally:
        pipeline.close()


def test_request_id_reaches_upstream_client_and_log(
    app: Pipeline, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="authproxy.access"):
        response = Client(app).get("/x", headers={"X-Request-ID": "abc-123"})
        response.close()  # the line is written when the body is closed
    assert response.headers["X-Request-ID"] == "abc-123"
    assert upstream.last().header("X-Request-Id") == "abc-123"
    access = [r.getMessage() for r in caplog.records if r.name == "authproxy.access"]
    assert len(access) == 1 and '"request_id":"abc-123"' in access[0]
    assert TOKEN not in access[0]


def test_go_token_with_dollar_signs_is_sent_literally(upstream: Upstream) -> None:
    config = from_environment(
        {"DASHBOARD_PROXY_URL": upstream.url, "DASHBOARD_TOKEN": "tok${env:HOME}$x"}
    )
    pipeline = build_app(config)
    try:
        Client(pipeline).get("/")
    finally:
        pipeline.close()
    assert upstream.last().header("Authorization") == "Bearer tok${env:HOME}$x"


def test_middlewares_wrap_any_wsgi_app(caplog: pytest.LogCaptureFixture) -> None:
    seen: dict[str, Any] = {}

    def inner(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.update(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"inner"]

    app = AccessLog(InjectHeaders(inner, set={"X-Injected": "yes"}), format="json")
    with caplog.at_level(logging.INFO, logger="authproxy.access"):
        response = Client(app).get("/page", headers={"Connection": "X-Injected"})
        response.close()
    assert response.data == b"inner"
    assert seen["HTTP_X_INJECTED"] == "yes"
    assert any('"path":"/page"' in r.getMessage() for r in caplog.records)


def test_a_raising_step_becomes_a_generic_500(caplog: pytest.LogCaptureFixture) -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError(f"boom with {TOKEN[:4]}")

    started: list[tuple[str, Any]] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        # Nothing was sent yet, so a server replaces the status (PEP 3333).
        started.append((status, exc_info))

    body = _Guard(broken, "my-step")(EnvironBuilder(path="/").get_environ(), start_response)
    assert [status for status, _ in started] == ["500 Internal Server Error"]
    assert started[0][1] is not None
    assert b"".join(body) == b"Internal Server Error\n"
    assert any("my-step" in r.getMessage() for r in caplog.records)


def test_close_closes_the_forwarder(upstream: Upstream) -> None:
    pipeline = build_app(stack(upstream))
    assert Client(pipeline).get("/").status_code == 200
    pipeline.close()
    assert pipeline.forwarder._pool.pool is None
