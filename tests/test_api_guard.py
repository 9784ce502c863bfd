"""The request guard through the app (Quart's test client over the scripted fake runner):
Host and Origin checks, CORS preflight, JSON bodies, the API key, the metrics' method label,
and what a client is told about a server error."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from api.app import ApiConfig, create_app
from api.guard import GuardPolicy
from tests.api_fakes import FakeRunner, serve_app
from tests.waits import read_until

EVIL_ORIGIN = "https://evil.example"
LOCAL_ORIGIN = "http://localhost:3000"
GENERATE = {"model": "fake", "prompt": "x", "stream": False}


@pytest.fixture
def fake() -> FakeRunner:
    return FakeRunner()


def app_client(fake: FakeRunner, **config: Any) -> Any:
    return create_app(fake, ApiConfig(model_name="fake:latest", **config))


@pytest.fixture
async def client(fake: FakeRunner) -> AsyncIterator[Any]:
    async with app_client(fake).test_app() as test_app:
        yield test_app.test_client()


async def error_of(response: Any, status: int) -> str:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    message = (await response.get_json())["error"]
    assert isinstance(message, str)
    return message


# ---- Host ----


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:11435", "0.0.0.0:11435"])
async def test_a_foreign_host_is_refused_with_403(client, fake, host) -> None:
    response = await client.post("/api/generate", json=GENERATE, headers={"Host": host})
    assert "not allowed" in await error_of(response, 403)
    response = await client.get("/api/tags", headers={"Host": host})
    await error_of(response, 403)
    assert fake.requests == []


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:11435", "127.0.0.1:11435", "[::1]:11435", "ui.localhost"]
)
async def test_local_hosts_are_served(client, fake, host) -> None:
    response = await client.post("/api/generate", json=GENERATE, headers={"Host": host})
    assert response.status_code == 200
    assert len(fake.requests) == 1


async def test_hosts_are_not_checked_when_exposed_and_can_be_added(fake) -> None:
    evil = {"Host": "evil.example.com"}
    for guard in (GuardPolicy(check_host=False), GuardPolicy(allowed_hosts=("*.example.com",))):
        async with app_client(fake, guard=guard).test_app() as test_app:
            response = await test_app.test_client().get("/api/tags", headers=evil)
            assert response.status_code == 200


async def test_the_host_header_over_a_real_socket(fake) -> None:
    """DNS rebinding as a browser does it: the page's own name in Host, sent to 127.0.0.1."""
    async with serve_app(app_client(fake)) as (host, port):

        async def get_tags(host_header: str) -> bytes:
            stream = await trio.open_tcp_stream(host, port)
            head = f"GET /api/tags HTTP/1.1\r\nHost: {host_header}\r\n\r\n"
            await stream.send_all(head.encode())
            answer = await read_until(stream, b"}", eof_ok=True)
            await stream.aclose()
            return answer

        assert (await get_tags(f"rebound.evil.example:{port}")).startswith(b"HTTP/1.1 403")
        assert (await get_tags(f"{host}:{port}")).startswith(b"HTTP/1.1 200")
        assert (await get_tags(f"localhost:{port}")).startswith(b"HTTP/1.1 200")


# ---- Origin and CORS ----


async def test_a_cross_origin_text_plain_post_never_reaches_the_runner(client, fake) -> None:
    # What a page on another site can send without a preflight.
    simple = {"Content-Type": "text/plain"}
    body = json.dumps(GENERATE)
    response = await client.post(
        "/api/generate", data=body, headers={**simple, "Origin": EVIL_ORIGIN}
    )
    assert "--origins" in await error_of(response, 403)
    assert "Access-Control-Allow-Origin" not in response.headers
    # The same from an allowed origin (or no browser at all) is still not JSON.
    for headers in ({**simple, "Origin": LOCAL_ORIGIN}, simple, {}):
        response = await client.post("/api/generate", data=body, headers=headers)
        assert "application/json" in await error_of(response, 415)
    for route in ("/completion", "/v1/chat/completions", "/tokenize"):
        response = await client.post(route, data=body, headers=simple)
        await error_of(response, 415)
    assert fake.requests == []


async def test_any_request_from_a_foreign_origin_is_refused(client) -> None:
    for origin in (EVIL_ORIGIN, "null", "http://localhost.evil.example"):
        response = await client.get("/api/tags", headers={"Origin": origin})
        await error_of(response, 403)


async def test_an_allowed_origin_gets_cors_headers(client) -> None:
    response = await client.post("/api/generate", json=GENERATE, headers={"Origin": LOCAL_ORIGIN})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == LOCAL_ORIGIN
    assert "Origin" in response.headers["Vary"]
    response = await client.get("/api/tags")  # not from a page: no CORS headers
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_configured_origins_are_allowed(fake) -> None:
    guard = GuardPolicy(allowed_origins=("https://*.example",))
    async with app_client(fake, guard=guard).test_app() as test_app:
        client = test_app.test_client()
        response = await client.get("/api/tags", headers={"Origin": EVIL_ORIGIN})
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == EVIL_ORIGIN


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_preflight_from_an_allowed_origin_is_answered_without_the_key(fake) -> None:
    async with app_client(fake, api_key="s3cret").test_app() as test_app:
        client = test_app.test_client()
        response = await client.options("/v1/chat/completions", headers=preflight(LOCAL_ORIGIN))
        assert response.status_code == 204
        headers = response.headers
        assert headers["Access-Control-Allow-Origin"] == LOCAL_ORIGIN
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert int(headers["Access-Control-Max-Age"]) > 0
        # The request it clears still needs the key.
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}]},
            headers={"Origin": LOCAL_ORIGIN},
        )
        await error_of(response, 401)
        assert response.headers["Access-Control-Allow-Origin"] == LOCAL_ORIGIN


async def test_preflight_from_a_foreign_origin_is_refused(client) -> None:
    response = await client.options("/v1/chat/completions", headers=preflight(EVIL_ORIGIN))
    await error_of(response, 403)
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Methods" not in response.headers


# ---- the API key ----


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_matches_in_any_case(fake, scheme) -> None:
    async with app_client(fake, api_key="s3cret").test_app() as test_app:
        client = test_app.test_client()
        response = await client.get("/api/tags", headers={"Authorization": f"{scheme} s3cret"})
        assert response.status_code == 200
        response = await client.get("/api/tags", headers={"Authorization": f"{scheme} s3cre"})
        await error_of(response, 401)


# ---- metrics ----


async def test_invented_methods_share_one_metrics_label(client) -> None:
    for method in ("BREW", "PROPFIND", "X-" + "A" * 40):
        response = await client.open("/api/tags", method=method)
        assert response.status_code == 405
    text = (await (await client.get("/metrics")).get_data()).decode()
    assert 'method="other",route="unmatched",status="405"} 3.0' in text
    assert "BREW" not in text
    assert "PROPFIND" not in text


# ---- server errors ----


async def test_a_bug_answers_a_generic_500_with_the_request_id(client, fake, caplog) -> None:
    fake.entry_error = RuntimeError("cannot open /home/alice/.secret/weights")
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        response = await client.post("/api/generate", json=GENERATE)
    body = await response.get_json()
    assert response.status_code == 500
    rid = response.headers["X-Request-Id"]
    assert body == {"error": f"internal error (request id {rid})", "request_id": rid}
    assert "secret" not in json.dumps(body)
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert len(logged) == 1
    assert ".secret/weights" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # with its traceback


async def test_client_errors_stay_specific_and_every_response_has_an_id(client) -> None:
    response = await client.post("/api/generate", json={"model": "other", "prompt": "x"})
    assert "other" in await error_of(response, 404)
    assert "request_id" not in await response.get_json()
    ids = {response.headers["X-Request-Id"]}
    for _ in range(3):
        ids.add((await client.get("/api/tags")).headers["X-Request-Id"])
    assert len(ids) == 4
