"""Impersonation through the real proxy: gunicorn, identity with groups, impersonate, injection.

The upstream stands in for the Kubernetes dashboard in front of the API
server: it records the raw header lines it gets (so repeated
``Impersonate-Group`` lines stay separate) and refuses what the API server's
impersonation filter refuses. Groups come from a token claim or from a local
stand-in for Cloudflare Access's ``get-identity`` endpoint.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import identity_config
from .impersonation import IDENTITY_PATH, AccessIdentity, ApiServerLike
from .jwks import AUDIENCE, TEAM_DOMAIN, JwksServer, SigningKey, claims, service_claims
from .support import TOKEN, Proxy, assert_no_secret, raw_request, write_toml
from .test_deploy import clean_env

HEADER = "Cf-Access-Jwt-Assertion"


def config(
    upstream: ApiServerLike,
    certs_url: str,
    identity: dict[str, Any],
    impersonate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """access-log -> identity -> impersonate -> inject-headers (the test token) -> upstream."""
    step = {"use": "impersonate", **(impersonate or {})}
    return identity_config(upstream, certs_url, then=[step], **identity)


@pytest.fixture(scope="module")
def jwks(key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([key]) as server:
        yield server


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServerLike]:
    server = ApiServerLike()
    yield server
    server.stop()


def _stopped(proxy: Proxy) -> None:
    proxy.stop()
    assert TOKEN not in proxy.logs(), "the injected token reached the proxy's log"


@pytest.fixture(scope="module")
def claim_proxy(apiserver: ApiServerLike, jwks: JwksServer) -> Iterator[Proxy]:
    """Groups from the token's ``groups`` claim; extras and uid; a public prefix."""
    proxy = Proxy(
        config(
            apiserver,
            jwks.url,
            {"groups": "claim:groups", "skip_paths": ["/public/*"]},
            {
                "extra": {"scopes": "${identity:scope}", "acme.com/project": "${identity:project}"},
                "uid": "${identity:subject}",
            },
        )
    )
    yield proxy
    _stopped(proxy)


@pytest.fixture(scope="module")
def access() -> Iterator[AccessIdentity]:
    server = AccessIdentity(
        {
            "alice@example.com": ["sre", "dev"],
            "carol@example.com": ["dev"],
            "eve@example.com": ["sre", "ops\r\nImpersonate-Group: system:masters"],
        }
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def access_proxy(
    apiserver: ApiServerLike, jwks: JwksServer, access: AccessIdentity
) -> Iterator[Proxy]:
    """Groups from get-identity; only sre, platform or bob may pass."""
    proxy = Proxy(
        config(
            apiserver,
            jwks.url,
            {
                "groups": "access",
                "identity_url": access.url,
                "groups_timeout": 3.0,
                "allow_groups": ["sre", "platform"],
                "allow_emails": ["bob@example.com"],
                "allow_service_tokens": ["ci-bot.access"],
            },
        )
    )
    yield proxy
    _stopped(proxy)


def get(proxy: Proxy, path: str = "/api/v1/namespaces", **headers: str) -> tuple[Any, str]:
    request_id = secrets.token_hex(8)
    response = requests.get(
        proxy.url + path, headers={"X-Request-ID": request_id, **headers}, timeout=30
    )
    assert_no_secret(response)
    return response, request_id


def refusal(
    proxy: Proxy, apiserver: ApiServerLike, path: str = "/api/v1/namespaces", **headers: str
) -> str:
    """Send a request the proxy must refuse (403) before the API server; the refusal
    its access line gives."""
    before = len(apiserver.seen)
    response, request_id = get(proxy, path, **headers)
    assert response.status_code == 403
    assert len(apiserver.seen) == before
    return str(proxy.access_line(request_id=request_id)["refusal"])


def fresh(key: SigningKey, **overrides: Any) -> str:
    """A token nobody has sent before (its own jti), so no cache knows it."""
    return key.sign(claims(jti=secrets.token_hex(8), **overrides))


# -- groups from the token ------------------------------------------------------------------


def test_claim_groups_reach_the_upstream_as_separate_lines_in_order(
    claim_proxy: Proxy, apiserver: ApiServerLike, key: SigningKey
) -> None:
    token = fresh(key, groups=["sre", "dev"], scope=["openid", "email"], project="web", sub="u-7")
    response, _ = get(claim_proxy, **{HEADER: token})
    assert response.status_code == 200, response.text
    seen = apiserver.last()
    assert seen.impersonation() == [
        ("Impersonate-User", "alice@example.com"),
        ("Impersonate-Group", "sre"),
        ("Impersonate-Group", "dev"),
        ("Impersonate-Uid", "u-7"),
        ("Impersonate-Extra-scopes", "openid"),
        ("Impersonate-Extra-scopes", "email"),
        ("Impersonate-Extra-acme.com%2Fproject", "web"),
    ]
    assert seen.values("Authorization") == [f"Bearer {TOKEN}"]
    # What the API server makes of it: one user, two groups, the extras by key.
    assert response.json() == {
        "user": "alice@example.com",
        "groups": ["sre", "dev"],
        "extra": {"scopes": ["openid", "email"], "acme.com/project": ["web"]},
    }


def test_a_single_string_claim_is_one_group_and_no_claim_is_none(
    claim_proxy: Proxy, apiserver: ApiServerLike, key: SigningKey
) -> None:
    response, _ = get(claim_proxy, **{HEADER: fresh(key, groups="sre")})
    assert response.status_code == 200
    assert apiserver.last().values("Impersonate-Group") == ["sre"]
    response, _ = get(claim_proxy, **{HEADER: fresh(key)})
    assert response.status_code == 200
    seen = apiserver.last()
    assert seen.values("Impersonate-User") == ["alice@example.com"]
    assert seen.values("Impersonate-Group") == []
    # Absent claims send no extra and no uid: nothing made up.
    assert [k for k, _ in seen.impersonation()] == ["Impersonate-User", "Impersonate-Uid"]


FORGED = [
    ("Impersonate-User", "root"),
    ("IMPERSONATE-GROUP", "system:masters"),
    ("impersonate-group", "system:masters"),
    ("Impersonate-Uid", "0"),
    ("impersonate-extra-scopes", "admin"),
    ("Impersonate-Extra-Acme.com%2Fproject", "all"),
    ("Impersonate_User", "root"),
    ("Impersonate_Group", "system:masters"),
    ("impersonate_extra_scopes", "admin"),
]


def _raw(port: int, path: str, lines: list[tuple[str, str]]) -> int:
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in lines) + "\r\n"
    return raw_request(port, head.encode("latin-1")).status


def test_forged_impersonation_headers_never_pass_in_any_casing(
    claim_proxy: Proxy, apiserver: ApiServerLike, key: SigningKey
) -> None:
    token = fresh(key, groups=["dev"], sub="u-1")
    status = _raw(claim_proxy.port, "/api/v1/secrets", [(HEADER, token), *FORGED])
    assert status == 200
    seen = apiserver.last()
    assert seen.impersonation() == [
        ("Impersonate-User", "alice@example.com"),
        ("Impersonate-Group", "dev"),
        ("Impersonate-Uid", "u-1"),
    ]
    assert "system:masters" not in json.dumps(seen.lines) and "root" not in json.dumps(seen.lines)


def test_a_group_name_with_a_line_break_is_refused(
    claim_proxy: Proxy, apiserver: ApiServerLike, key: SigningKey
) -> None:
    token = fresh(key, groups=["dev", "sre\r\nImpersonate-Group: system:masters"])
    assert refusal(claim_proxy, apiserver, **{HEADER: token}) == (
        "impersonate: Impersonate-Group would hold CR, LF or NUL"
    )
    assert "Impersonate-Group would hold CR, LF or NUL; request refused" in claim_proxy.logs()


def test_a_groups_claim_that_is_not_names_is_refused(
    claim_proxy: Proxy, apiserver: ApiServerLike, key: SigningKey
) -> None:
    token = fresh(key, groups=[{"name": "sre"}])
    assert refusal(claim_proxy, apiserver, **{HEADER: token}) == (
        "claim 'groups' is not a list of group names"
    )


def test_a_skipped_path_is_refused_without_an_identity_by_default(
    claim_proxy: Proxy, apiserver: ApiServerLike
) -> None:
    assert refusal(claim_proxy, apiserver, "/public/logo.svg") == (
        "impersonate: no verified identity"
    )


def test_without_require_identity_a_skipped_path_goes_with_no_impersonation(
    start_proxy: Callable[..., Proxy], apiserver: ApiServerLike, jwks: JwksServer, key: SigningKey
) -> None:
    proxy = start_proxy(
        config(apiserver, jwks.url, {"skip_paths": ["/public/*"]}, {"require_identity": False})
    )
    status = _raw(proxy.port, "/public/logo.svg", FORGED)
    assert status == 200
    seen = apiserver.last()
    assert seen.request_line.startswith("GET /public/logo.svg ")
    assert seen.impersonation() == []
    # The service account's own rights: the injected token, and nobody named.
    assert seen.values("Authorization") == [f"Bearer {TOKEN}"]
    # With a token the same proxy does impersonate, groups from the default claim.
    response, _ = get(proxy, **{HEADER: fresh(key, groups=["dev"])})
    assert response.json()["user"] == "alice@example.com"
    assert response.json()["groups"] == ["dev"]


def test_a_service_token_is_impersonated_by_its_name(
    access_proxy: Proxy, apiserver: ApiServerLike, access: AccessIdentity, key: SigningKey
) -> None:
    hits = access.hits
    token = key.sign(service_claims("ci-bot.access", jti=secrets.token_hex(8)))
    response, _ = get(access_proxy, **{HEADER: token})
    assert response.status_code == 200
    assert apiserver.last().impersonation() == [("Impersonate-User", "ci-bot.access")]
    assert access.hits == hits, "a service token is nobody to get-identity"


# -- groups from Access's get-identity -------------------------------------------------------


def test_access_groups_come_from_get_identity_with_only_the_token(
    access_proxy: Proxy, apiserver: ApiServerLike, access: AccessIdentity, key: SigningKey
) -> None:
    token = fresh(key)
    hits = access.hits
    response, _ = get(
        access_proxy, Cookie=f"CF_Authorization={token}; kubeconfig-session=abc; theme=dark"
    )
    assert response.status_code == 200, response.text
    assert apiserver.last().impersonation() == [
        ("Impersonate-User", "alice@example.com"),
        ("Impersonate-Group", "sre"),
        ("Impersonate-Group", "dev"),
    ]
    assert access.hits == hits + 1
    asked = access.requests[-1]
    assert asked.path == IDENTITY_PATH
    assert asked.header("Cookie") == f"CF_Authorization={token}"
    names = {k.lower() for k, _ in asked.headers}
    # Nothing of the client's but the token, and not the injected credential.
    assert names <= {"host", "cookie", "accept", "accept-encoding", "user-agent"}, names
    assert TOKEN not in json.dumps(asked.headers)
    # Asked once per token: the same token again is answered from memory, and
    # the cookie the last answer set is not sent with the next person's token.
    get(access_proxy, **{HEADER: token})
    assert access.hits == hits + 1
    other = fresh(key, email="carol@example.com")
    get(access_proxy, **{HEADER: other})
    assert access.hits == hits + 2
    assert access.requests[-1].header("Cookie") == f"CF_Authorization={other}"


def test_a_burst_with_one_new_token_asks_access_once(
    access_proxy: Proxy, apiserver: ApiServerLike, access: AccessIdentity, key: SigningKey
) -> None:
    token = fresh(key)
    hits = access.hits
    access.delay = 0.5  # every request of the burst arrives while the first one asks
    try:
        with ThreadPoolExecutor(50) as pool:
            statuses = list(
                pool.map(lambda _: get(access_proxy, **{HEADER: token})[0].status_code, range(50))
            )
    finally:
        access.delay = 0.0
    assert statuses == [200] * 50
    assert access.hits == hits + 1


def test_allow_groups_admits_a_listed_group_and_refuses_others(
    access_proxy: Proxy, apiserver: ApiServerLike, key: SigningKey
) -> None:
    token = fresh(key, email="carol@example.com")
    assert refusal(access_proxy, apiserver, **{HEADER: token}) == (
        "not allowed by policy: carol@example.com"
    )
    # alice is not listed by address: her group sre admits her.
    response, _ = get(access_proxy, **{HEADER: fresh(key)})
    assert response.status_code == 200
    assert apiserver.last().values("Impersonate-Group") == ["sre", "dev"]
    # Lists combine by "or": bob has no group, but his address is listed.
    response, _ = get(access_proxy, **{HEADER: fresh(key, email="bob@example.com")})
    assert response.status_code == 200
    assert apiserver.last().impersonation() == [("Impersonate-User", "bob@example.com")]


def test_a_group_name_from_access_with_a_line_break_is_refused(
    access_proxy: Proxy, apiserver: ApiServerLike, key: SigningKey
) -> None:
    token = fresh(key, email="eve@example.com")
    assert "CR, LF or NUL" in refusal(access_proxy, apiserver, **{HEADER: token})


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("error", "groups unavailable: HTTP 500"),
        ("garbage", "groups unavailable: the answer is not JSON"),
        ("other", "groups unavailable: the answer is about another identity"),
        ("stall", "groups unavailable: timed out"),
    ],
)
def test_an_access_outage_refuses_with_503_and_says_why(
    access_proxy: Proxy,
    apiserver: ApiServerLike,
    access: AccessIdentity,
    key: SigningKey,
    mode: str,
    reason: str,
) -> None:
    before = len(apiserver.seen)
    token = fresh(key)
    access.set_mode(mode)
    try:
        response, request_id = get(access_proxy, **{HEADER: token})
    finally:
        access.set_mode("ok")
    assert response.status_code == 503
    assert response.text == "Service Unavailable\n"
    assert len(apiserver.seen) == before
    assert access_proxy.access_line(request_id=request_id)["refusal"].startswith(reason)
    assert f"cannot fetch groups from {access.url}: {reason.split(': ', 1)[1]}" in (
        access_proxy.logs()
    )
    # A failure is not remembered: once Access answers again, the same token passes.
    response, _ = get(access_proxy, **{HEADER: token})
    assert response.status_code == 200


def test_readiness_does_not_wait_on_get_identity(
    access_proxy: Proxy, access: AccessIdentity
) -> None:
    access.set_mode("error")
    try:
        response, _ = get(access_proxy, "/readyz")
    finally:
        access.set_mode("ok")
    assert response.status_code == 200


# -- check-config ----------------------------------------------------------------------------


def test_check_config_shows_the_step_and_redacts_only_secrets(
    tmp_path: Path, apiserver: ApiServerLike, jwks: JwksServer
) -> None:
    cfg = config(
        apiserver,
        jwks.url,
        {"groups": "access", "identity_url": "https://myteam.cloudflareaccess.com/x"},
        {"extra": {"scopes": "${identity:scope}"}, "uid": "${env:AUTHPROXY_TEST_UID}"},
    )
    path = write_toml(tmp_path / "authproxy.toml", cfg)
    result = subprocess.run(
        [sys.executable, "-m", "authproxy.cli", "check-config", "--config", str(path)],
        cwd=tmp_path,
        env={**clean_env(), "AUTHPROXY_TEST_UID": "uid-secret-7"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    [line] = [x for x in result.stdout.splitlines() if x.startswith("  - impersonate ")]
    assert json.loads(line.removeprefix("  - impersonate ")) == {
        "user": "${identity:email}",
        "groups": ["${identity:groups}"],
        "uid": "*** (from env)",
        "extra": {"Impersonate-Extra-scopes": "${identity:scope}"},
        "require_identity": True,
    }
    assert "from https://myteam.cloudflareaccess.com/x" in result.stdout
    assert "uid-secret-7" not in output and TOKEN not in output


@pytest.mark.parametrize(
    ("steps", "where", "problem"),
    [
        (["impersonate"], "pipeline[1] (impersonate)", "needs the 'identity' step before it"),
        (["impersonate", "identity"], "pipeline[1] (impersonate)", "needs the 'identity' step"),
    ],
)
def test_impersonate_without_identity_before_it_is_a_config_error(
    tmp_path: Path,
    apiserver: ApiServerLike,
    jwks: JwksServer,
    steps: list[str],
    where: str,
    problem: str,
) -> None:
    identity = {"use": "identity", "audience": [AUDIENCE], "certs_url": jwks.url}
    identity["team_domain"] = TEAM_DOMAIN
    pipeline: list[dict[str, Any]] = [{"use": "access-log"}]
    pipeline += [identity if s == "identity" else {"use": s} for s in steps]
    path = write_toml(
        tmp_path / "authproxy.toml", {"upstream": {"url": apiserver.url}, "pipeline": pipeline}
    )
    result = subprocess.run(
        [sys.executable, "-m", "authproxy.cli", "check-config", "--config", str(path)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"{where}: {problem}" in result.stderr
