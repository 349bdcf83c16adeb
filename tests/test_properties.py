"""Properties of the pure parts, checked by hypothesis over inputs nobody would write by hand:
hop-by-hop stripping, the request target and path joining, header templates, the
request head written to the upstream, and the identity policy (who passes, which
paths skip it).
"""

from __future__ import annotations

import posixpath
import string
from typing import Any
from urllib.parse import unquote

import httptools
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from authproxy.context import IDENTITY, VerifiedIdentity, request_path
from authproxy.errors import ConfigError
from authproxy.headers import (
    HOP_BY_HOP_KEYS,
    REQUEST_CHUNKED_KEY,
    SANITIZED_KEY,
    environ_key,
    has_ctl,
    sanitize,
)
from authproxy.middleware.identity.policy import Policy, SkipPaths
from authproxy.middleware.inject import InjectHeaders
from authproxy.middleware.templates import Template
from authproxy.upstream.forwarder import join_path, request_target
from authproxy.upstream.transport import encode_head

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
token = st.text(TCHAR, min_size=1, max_size=20)
HOP_NAMES = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "Te",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
]
SENSITIVE = [
    "Authorization",
    "Cookie",
    "X-Auth-Request-Email",
    "Impersonate-User",
    "Impersonate-Group",
    "Impersonate-Extra-Scopes",
    "Host",
    "X-Forwarded-For",
    "Content-Length",
    "Content-Type",
    "X-Request-Id",
]
header_names = st.one_of(st.sampled_from(HOP_NAMES + SENSITIVE), token)
# Header values as WSGI gives them: latin-1 text without CR, LF or NUL.
field_value = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
)


def _env_key(name: str) -> str:
    return environ_key(name)


@st.composite
def environs(draw: st.DrawFn) -> dict[str, Any]:
    env: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.input": None}
    for name in draw(st.lists(header_names, max_size=12)):
        env[_env_key(name)] = draw(field_value)
    if draw(st.booleans()):
        listed = draw(st.lists(header_names, max_size=6))
        spacing = draw(st.sampled_from([",", ", ", " , ", ",,"]))
        env["HTTP_CONNECTION"] = spacing.join(
            draw(st.sampled_from([n, n.lower(), n.upper()])) for n in listed
        )
    return env


# -- hop-by-hop stripping ------------------------------------------------------------------


@given(environs(), st.booleans())
def test_sanitize_leaves_no_hop_by_hop_or_connection_listed_header(
    env: dict[str, Any], strip: bool
) -> None:
    original = dict(env)
    listed = {t.strip().lower() for t in original.get("HTTP_CONNECTION", "").split(",")}
    sanitize(env, strip_impersonation=strip)
    for key in env:
        assert key not in HOP_BY_HOP_KEYS
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
            assert name not in listed, f"{name} was named in Connection"
            if strip:
                assert not name.startswith("impersonate-")
    # Framing is the server's: Connection can never remove it.
    for key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
        assert env.get(key) == original.get(key)
    # What survives is untouched, and nothing is added but authproxy.* marks.
    for key, value in env.items():
        if not key.startswith("authproxy."):
            assert original[key] == value
    assert bool(env.get(REQUEST_CHUNKED_KEY)) == ("HTTP_TRANSFER_ENCODING" in original)


@given(environs())
def test_sanitize_runs_once_so_what_is_injected_after_it_stays(env: dict[str, Any]) -> None:
    sanitize(env)
    env["HTTP_AUTHORIZATION"] = "Bearer injected"
    env["HTTP_CONNECTION"] = "Authorization"
    before = dict(env)
    sanitize(env)
    assert env == before and env[SANITIZED_KEY] is True


# -- the request target and path joining -----------------------------------------------------------

segment = st.lists(
    st.sampled_from(list(string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@/") + ["%2F"]),
    max_size=12,
).map("".join)
origin_form = st.builds(
    lambda s, q: "/" + s + (("?" + q) if q is not None else ""), segment, st.none() | segment
)


@given(st.sampled_from(["", "/", "/api", "/api/", "/a/b", "/a/b/"]), origin_form)
def test_joined_path_starts_with_the_base_and_keeps_the_target_verbatim(
    base: str, target: str
) -> None:
    joined = join_path(base, target)
    assert joined.startswith(base)
    if base:
        # The target follows at a segment boundary: at most one slash is merged.
        assert joined == base.rstrip("/") + "/" + target[1:] or (
            not base.endswith("/") and joined == base + target
        )
        assert joined[len(base.rstrip("/"))] == "/"
    else:
        assert joined == target
    assert joined.endswith(target[1:])


authority = st.text(string.ascii_lowercase + string.digits + ".:@-_", min_size=1, max_size=20)


@given(
    st.sampled_from(["http", "https", "HTTP", "hTtPs"]),
    authority,
    st.sampled_from(["", "/", "/x", "//y", "/a?b", "?q", "?q/r", "/%2F?x=http://z/"]),
)
def test_an_absolute_target_keeps_only_its_path(scheme: str, host: str, rest: str) -> None:
    raw = f"{scheme}://{host}{rest}"
    target = request_target({"RAW_URI": raw})
    assert target is not None and target.startswith("/")
    assert raw.endswith(target) or target == "/" + rest
    # Never the authority: nothing before the rest (at most a "/" put in front of it).
    assert len(target) <= len(rest) + 1


@given(st.text(max_size=30))
def test_a_raw_target_is_verbatim_or_refused(raw: str) -> None:
    assume(raw)  # an empty RAW_URI is no RAW_URI
    target = request_target({"RAW_URI": raw})
    if raw.startswith("/"):
        assert target == raw
    elif target is not None:
        assert target.startswith("/") and raw.lower().startswith(("http://", "https://"))


@given(st.text(max_size=30), st.text(string.printable.strip() or "a", max_size=20))
def test_a_target_rebuilt_from_path_info_is_plain_ascii(path: str, query: str) -> None:
    """Under a WSGI server without RAW_URI the decoded path is quoted back."""
    assume(" " not in query)
    target = request_target({"PATH_INFO": "/" + path, "QUERY_STRING": query})
    assert target is not None and target.isascii()
    path_part = target.partition("?")[0]
    assert not has_ctl(path_part) and " " not in path_part


# -- the request head written upstream -------------------------------------------------------------

header_pairs = st.lists(st.tuples(token, st.text(max_size=30)), max_size=8)


@given(token, st.text(max_size=30), header_pairs)
def test_encode_head_never_writes_a_line_it_was_not_given(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    try:
        head = encode_head(method, target, headers)
    except (ValueError, UnicodeEncodeError):
        values = [target, *(v for _, v in headers)]
        assert any(has_ctl(v) or not all(ord(c) < 256 for c in v) for v in values)
        return
    lines = head.split(b"\r\n")
    assert lines[-2:] == [b"", b""]
    assert len(lines) == len(headers) + 3
    assert all(b"\r" not in line and b"\n" not in line and b"\0" not in line for line in lines)


class _Parsed:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.complete = True


vchar_value = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=30,
).map(str.strip)
path_target = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(
    lambda s: "/" + s
)


@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path_target,
    st.lists(st.tuples(token, vchar_value), max_size=8),
)
def test_encode_head_round_trips_through_a_real_parser(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    assume(not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers))
    parsed = _Parsed()
    parser = httptools.HttpRequestParser(parsed)
    parser.feed_data(encode_head(method, target, [("Host", "up"), *headers]))
    assert parsed.complete
    assert parser.get_method().decode() == method
    assert parsed.url.decode("latin-1") == target
    assert parsed.headers == [(b"Host", b"up")] + [
        (n.encode(), v.encode("latin-1")) for n, v in headers
    ]


# -- header templates ------------------------------------------------------------------------------

# Anything a JSON claim may hold, lone surrogates ("\ud800") included.
claim_text = st.text(max_size=20) | st.text(
    st.sampled_from(["\ud800", "\udfff", "a", "\r", "\n", "\x00", "\u00e9", "\u0110", "\u2028"]),
    max_size=6,
)
literal = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="$\x7f"), max_size=10
)
template_part = st.one_of(
    literal,
    st.just("$$"),
    st.sampled_from(
        ["${identity:email}", "${identity:name}", "${identity:nick}", "${identity:groups}"]
    ),
)


def _identity(email: str, nick: str, groups: list[str]) -> VerifiedIdentity:
    return VerifiedIdentity(
        subject="sub-1",
        email=email or None,
        claims={"email": email, "nick": nick, "groups": groups},
    )


@given(
    st.lists(template_part, min_size=1, max_size=6),
    claim_text,
    claim_text,
    st.lists(claim_text, max_size=3),
)
def test_a_rendered_template_is_a_wsgi_header_value_or_nothing(
    parts: list[str], email: str, nick: str, groups: list[str]
) -> None:
    text = "".join(parts)
    template = Template(text, key="set.X-Test")
    environ = {IDENTITY: _identity(email, nick, groups)}
    value = template.render(environ)
    if value is None:
        assert template.uses_identity
        return
    # WSGI header values are latin-1 text: every rendered value must encode.
    value.encode("latin-1")
    if not template.uses_identity:
        assert value == text.replace("$$", "$")


@given(st.text(max_size=20))
def test_a_constant_template_with_a_line_break_is_refused_at_start_up(text: str) -> None:
    assume("$" not in text)
    if has_ctl(text):
        with pytest.raises(ConfigError):
            Template(text, key="set.X-Test")
    else:
        assert Template(text, key="set.X-Test").constant == text


@given(claim_text, claim_text)
def test_injected_headers_never_carry_a_line_break(email: str, nick: str) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("200 OK", [])
        return []

    statuses: list[str] = []
    middleware = InjectHeaders(
        app, set={"X-Email": "${identity:email}", "X-Who": "<${identity:nick}>"}
    )
    environ = {"REQUEST_METHOD": "GET", IDENTITY: _identity(email, nick, [])}
    middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
    if statuses[0].startswith("500"):
        assert has_ctl(email) or has_ctl(nick)
        return
    for key in ("HTTP_X_EMAIL", "HTTP_X_WHO"):
        if key in seen:
            assert not has_ctl(seen[key])
            seen[key].encode("latin-1")


# -- the identity policy ---------------------------------------------------------------------------

local = st.text(string.ascii_letters + string.digits + "._+-", min_size=1, max_size=8)
domain = st.sampled_from(
    [
        "example.com",
        "EXAMPLE.com",
        "evil.com",
        "example.com.evil.com",
        "sub.example.com",
        "exampleXcom",
        "xexample.com",
    ]
)


@given(
    local,
    domain,
    st.sampled_from(["", "@", "evil.com@"]),
    st.lists(st.sampled_from(["example.com", "@example.com", "Example.COM"]), max_size=2),
    st.lists(st.emails(), max_size=2),
)
def test_an_email_passes_only_by_exact_address_or_exact_domain(
    user: str, host: str, prefix: str, domains: list[str], emails: list[str]
) -> None:
    policy = Policy(emails=emails, domains=domains, service_tokens=None, claims=None)
    email = f"{prefix}{user}@{host}"
    allowed = policy.allows(VerifiedIdentity(subject="s", email=email))
    if not domains and not emails:
        assert allowed
        return
    by_domain = bool(domains) and host.lower() == "example.com"
    by_address = email.lower() in {e.lower() for e in emails}
    assert allowed == (by_domain or by_address)


@given(
    st.lists(st.sampled_from(["ops", "dev", "admins"]), max_size=3),
    st.one_of(
        st.none(),
        st.sampled_from(["ops", "OPS", "admin", ""]),
        st.lists(st.sampled_from(["ops", "dev", "x", 1, None]), max_size=3),
    ),
    st.one_of(st.none(), st.text(max_size=10)),
)
def test_claim_and_service_token_rules_match_exactly(
    accepted: list[str], claim: Any, service_token: str | None
) -> None:
    policy = Policy(
        emails=None,
        domains=None,
        service_tokens=["ci-bot"],
        claims={"groups": accepted} if accepted else None,
    )
    identity = VerifiedIdentity(subject="s", service_token=service_token, claims={"groups": claim})
    values = claim if isinstance(claim, list) else [claim]
    expected = service_token == "ci-bot" or any(
        isinstance(v, str) and v in accepted for v in values
    )
    assert policy.allows(identity) == expected


SEGMENTS = [
    "a",
    "static",
    "admin",
    "",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "%252e%252e",
    "%25",
    ";x",
    "a%00",
]


def _resolve(path: str) -> str:
    """Where an upstream that is lax in every way would route *path*: decoded (twice),
    backslashes as slashes, dot segments resolved, slashes collapsed."""
    for _ in range(3):
        path = unquote(path, encoding="latin-1")
    path = path.replace("\\", "/")
    resolved = posixpath.normpath(path)
    return resolved + ("/" if path.endswith("/") and resolved != "/" else "")


@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
def test_a_skipped_path_stays_under_its_prefix_however_it_is_resolved(segments: list[str]) -> None:
    raw = "/static/" + "/".join(segments)
    skip = SkipPaths(["/static/*", "/favicon.ico"])
    environ = {
        "RAW_URI": raw,
        "PATH_INFO": unquote(raw, encoding="latin-1"),  # what gunicorn puts there
    }
    if skip.match(environ):
        assert _resolve(raw).startswith("/static/") or _resolve(raw) == "/static", raw


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/a/b?x=/../..", "/a/b"),
        ("/a//b/", "/a//b/"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a;x/..;y/b", "/b"),
        ("/a/%2E%2e/b", "/b"),
        ("/%61%2e%2e", "/a.."),
        ("/a/%2fb", "/a/%2fb"),
        ("http://host/x/../y", "/y"),
        ("/..", None),
        ("*", None),
    ],
)
def test_the_path_every_decision_is_made_on(raw: str, path: str | None) -> None:
    assert request_path({"RAW_URI": raw}) == path


plain_segment = st.text("ab.-_~:@!$&'()*+,=\\", max_size=4).filter(lambda s: s[:1] != ".")


@given(st.lists(plain_segment, min_size=1, max_size=6))
def test_a_path_with_nothing_to_resolve_is_kept_as_sent(segments: list[str]) -> None:
    raw = "/" + "/".join(segments)
    assert request_path({"RAW_URI": raw}) == raw
