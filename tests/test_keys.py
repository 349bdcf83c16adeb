"""authproxy.keys: reading key sets and fetching them, against real local servers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from authproxy.middleware.identity.keys import KeyCache, KeyFetchError, parse_key_set

from .jwks import JwksServer, SigningKey, certs_document
from .support import Upstream


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("RSA")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey("EC")


def test_cloudflare_certs_document(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    document = certs_document([rsa_key, ec_key])
    assert set(document) == {"keys", "public_cert", "public_certs"}
    keys = parse_key_set(json.dumps(document).encode(), ["RS256", "ES256"])
    assert set(keys) == {rsa_key.kid, ec_key.kid}
    assert keys[rsa_key.kid].key == rsa_key.public


def test_keys_for_other_algorithms_are_ignored(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    document = certs_document([rsa_key, ec_key])
    assert set(parse_key_set(json.dumps(document).encode(), ["RS256"])) == {rsa_key.kid}


def test_hmac_and_encryption_keys_are_never_trusted(rsa_key: SigningKey) -> None:
    oct_key = {"kty": "oct", "kid": "shared", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "alg": "HS256"}
    enc_key = {**rsa_key.jwk(), "kid": "for-encryption", "use": "enc"}
    document = {"keys": [oct_key, enc_key, rsa_key.jwk()]}
    keys = parse_key_set(json.dumps(document).encode(), ["RS256", "HS256"])
    assert set(keys) == {rsa_key.kid}  # HS256 is never passed in by Identity, but still
    with pytest.raises(KeyFetchError):
        parse_key_set(json.dumps({"keys": [oct_key]}).encode(), ["RS256"])


@pytest.mark.parametrize(
    "data",
    [b"<html>", b"[]", b'{"keys": {}}', b'{"keys": []}', b'{"public_cert": {}}', b"\xff\xfe"],
)
def test_not_a_key_set(data: bytes) -> None:
    with pytest.raises(KeyFetchError):
        parse_key_set(data, ["RS256"])


def test_a_token_without_kid_matches_only_a_single_key(
    rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    with JwksServer([rsa_key]) as one, JwksServer([rsa_key, ec_key]) as two:
        single = KeyCache(one.url, algorithms=["RS256", "ES256"])
        double = KeyCache(two.url, algorithms=["RS256", "ES256"])
        try:
            assert single.get(None) is not None
            assert double.get(None) is None
            assert single.get("") is None
        finally:
            single.close()
            double.close()


def test_environment_proxies_are_ignored(
    rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    with JwksServer([rsa_key]) as jwks:
        keys = KeyCache(jwks.url, algorithms=["RS256"])
        try:
            assert keys.kids() == [rsa_key.kid]
        finally:
            keys.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "path, why", [("/redirect", "HTTP 302"), ("/bytes/2000000?cl=1", "larger than")]
)
def test_redirects_and_huge_documents_are_failures(
    upstream: Upstream, caplog: pytest.LogCaptureFixture, path: str, why: str
) -> None:
    caplog.set_level(logging.WARNING, logger="authproxy.keys")
    keys = KeyCache(upstream.url + path, algorithms=["RS256"])
    try:
        assert not keys.has_keys()
        assert len(upstream.seen) == 1  # the redirect was not followed
        assert why in caplog.text
    finally:
        keys.close()


def test_unreachable_endpoint_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    keys = KeyCache("http://127.0.0.1:9/certs", algorithms=["RS256"], timeout=2)
    try:
        assert not keys.has_keys()
        assert keys.get("any") is None
        assert "no keys, refusing every request" in caplog.text
    finally:
        keys.close()
