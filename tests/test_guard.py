"""The request guard's decisions (``api/guard.py``), without an app or an event loop."""

from __future__ import annotations

import pytest

from api.guard import (
    GuardPolicy,
    bearer_token_matches,
    binds_to_loopback,
    body_refusal,
    hostname_of,
    is_local_origin,
    method_label,
    split_list,
)

LOCAL = GuardPolicy()

# ---- Host ----


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost", "localhost"),
        ("LocalHost:11435", "localhost"),
        ("localhost.", "localhost"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:11435", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("my_box.lan", "my_box.lan"),
        ("[::1", None),
        ("[::1]x", None),
        ("[::1]:port", None),
        ("[evil.example]:80", None),
        ("localhost:abc", None),
        ("localhost:123456", None),
        ("loc alhost", None),
        ("evil.example/x", None),
        ("a..b", None),
        (":80", None),
    ],
)
def test_hostname_of_a_host_header(header: str, name: str | None) -> None:
    assert hostname_of(header) == name


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:11435",
        "LOCALHOST:1",
        "localhost.",
        "127.0.0.1",
        "127.0.0.1:11435",
        "127.3.2.1:80",
        "[::1]",
        "[::1]:11435",
        "[::ffff:127.0.0.1]:8080",
        "app.localhost",
        "a.b.localhost:3000",
        "",
        None,
    ],
)
def test_local_hosts_pass(host: str | None) -> None:
    assert LOCAL.host_refusal(host) is None


@pytest.mark.parametrize(
    "host",
    [
        "evil.example.com",
        "evil.example.com:11435",
        "127.0.0.1.evil.example",
        "localhost.evil.example",
        "evillocalhost",
        "0.0.0.0",
        "192.168.1.20:11435",
        "[::2]:11435",
        "[fe80::1]",
        "myhost.local",
        "service.internal",
        "localhost:abc",
        "127.0.0.1:99999999",
    ],
)
def test_other_hosts_are_refused_while_on_loopback(host: str) -> None:
    refusal = LOCAL.host_refusal(host)
    assert refusal is not None
    assert "--allowed-hosts" in refusal
    assert GuardPolicy(check_host=False).host_refusal(host) is None


def test_configured_hosts_are_allowed_by_name_or_pattern() -> None:
    policy = GuardPolicy(allowed_hosts=("MyBox.local", "*.example.com", "[::2]:1", "lan:11435"))
    for host in ("mybox.local", "mybox.local:11435", "a.example.com:80", "[::2]", "lan"):
        assert policy.host_refusal(host) is None, host
    for host in ("other.local", "example.com", "a.example.com.evil"):
        assert policy.host_refusal(host) is not None, host
    everyone = GuardPolicy(allowed_hosts=("*",))
    assert everyone.host_refusal("anything.example:1") is None
    assert everyone.host_refusal("bad host") is not None  # malformed is never a host


def test_a_long_host_is_quoted_short() -> None:
    refusal = LOCAL.host_refusal("x" * 5000)
    assert refusal is not None
    assert len(refusal) < 300


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("box.localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
    ],
)
def test_binds_to_loopback(bind: str, loopback: bool) -> None:
    def no_dns(name: str) -> list[str]:
        raise AssertionError(f"{name} needed no resolver")

    assert binds_to_loopback(bind, resolve=no_dns) is loopback


def test_a_bind_name_counts_as_loopback_when_all_its_addresses_are() -> None:
    addresses = {"loop": ["127.0.1.1", "::1"], "mixed": ["127.0.0.1", "10.0.0.2"], "none": []}

    def resolve(name: str) -> list[str]:
        if name not in addresses:
            raise OSError("unknown host")
        return addresses[name]

    assert binds_to_loopback("loop", resolve=resolve)
    assert not binds_to_loopback("mixed", resolve=resolve)
    assert not binds_to_loopback("none", resolve=resolve)
    assert not binds_to_loopback("unknown", resolve=resolve)


# ---- Origin ----


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "http://localhost:3000",
        "HTTPS://LOCALHOST:8443",
        "http://127.0.0.1:5173",
        "http://[::1]:5173",
        "http://app.localhost:3000",
        "app://-",
        "file://",
        "tauri://localhost",
        "vscode-webview://1a2b3c",
        "vscode-file://vscode-app",
    ],
)
def test_local_and_app_origins_are_allowed_by_default(origin: str) -> None:
    assert is_local_origin(origin)
    assert LOCAL.origin_refusal(origin) is None


@pytest.mark.parametrize(
    "origin",
    [
        "null",  # a sandboxed frame on any site
        "https://evil.example",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io",
        "http://evil.example:11435",
        "http://localhost:99999",
        "http://localhost/path",
        "http://user@localhost",
        "ftp://localhost",
        "chrome-extension://abcdef",
        "",
    ],
)
def test_other_origins_are_refused(origin: str) -> None:
    refusal = LOCAL.origin_refusal(origin)
    assert refusal is not None
    assert "--origins" in refusal


def test_no_origin_is_not_a_browser_and_passes() -> None:
    assert LOCAL.origin_refusal(None) is None


def test_configured_origins_with_globs() -> None:
    policy = GuardPolicy(
        allowed_origins=(
            "https://App.Example.com/",
            "https://*.corp.example",
            "chrome-extension://*",
        )
    )
    for origin in (
        "https://app.example.com",
        "https://a.corp.example",
        "chrome-extension://abc",
        "http://localhost:3000",  # the defaults stay
    ):
        assert policy.origin_refusal(origin) is None, origin
    for origin in ("http://app.example.com", "https://corp.example", "https://evil.example"):
        assert policy.origin_refusal(origin) is not None, origin
    everyone = GuardPolicy(allowed_origins=("*",))
    assert everyone.origin_refusal("https://evil.example") is None
    assert everyone.origin_refusal("null") is None


def test_cors_headers() -> None:
    headers = LOCAL.preflight_headers("Content-Type, authorization,x-stainless-os, bad header")
    assert headers["Access-Control-Allow-Headers"] == "Content-Type, authorization, x-stainless-os"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Headers" not in LOCAL.preflight_headers(None)
    response = LOCAL.response_headers("http://localhost:3000")
    assert response["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert response["Vary"] == "Origin"
    assert "X-Request-Id" in response["Access-Control-Expose-Headers"]


def test_split_list() -> None:
    assert split_list(" a, b ,,c ") == ("a", "b", "c")
    assert split_list("") == ()
    assert split_list(None) == ()


# ---- bodies, keys, labels ----


@pytest.mark.parametrize(
    ("method", "mimetype", "refused"),
    [
        ("POST", "application/json", False),
        ("POST", "Application/JSON", False),
        ("POST", "application/vnd.api+json", False),
        ("POST", "text/plain", True),
        ("POST", "application/x-www-form-urlencoded", True),
        ("POST", "multipart/form-data", True),
        ("POST", "text/json+plain", True),
        ("POST", "", True),
        ("PUT", "text/plain", True),
        ("GET", "", False),
        ("GET", "text/plain", False),
    ],
)
def test_a_body_must_be_json(method: str, mimetype: str, refused: bool) -> None:
    refusal = body_refusal(method, mimetype)
    assert (refusal is not None) is refused
    if refusal is not None:
        assert "application/json" in refusal


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("BEARER s3cret", True),
        ("  Bearer   s3cret  ", True),
        ("Bearer s3cret2", False),
        ("Bearer s3cre", False),
        ("Basic s3cret", False),
        ("s3cret", False),
        ("Bearer", False),
        ("", False),
        (None, False),
    ],
)
def test_bearer_scheme_in_any_case(header: str | None, ok: bool) -> None:
    assert bearer_token_matches(header, "s3cret") is ok


def test_an_empty_token_never_matches_a_key() -> None:
    assert not bearer_token_matches("Bearer ", "k")
    assert not bearer_token_matches("Bearer é", "k")


@pytest.mark.parametrize(
    ("method", "label"),
    [
        ("GET", "GET"),
        ("POST", "POST"),
        ("OPTIONS", "OPTIONS"),
        ("HEAD", "HEAD"),
        ("PUT", "PUT"),
        ("DELETE", "DELETE"),
        ("PATCH", "PATCH"),
        ("BREW", "other"),
        ("get", "other"),
        ("X" * 1000, "other"),
    ],
)
def test_method_labels_come_from_a_fixed_set(method: str, label: str) -> None:
    assert method_label(method) == label
