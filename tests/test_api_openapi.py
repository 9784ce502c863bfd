"""``GET /openapi.json``: every registered route is in it, and its request schemas say what the
routes accept (they are built from the fields the routes read with, ``api/fields.py``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import schemathesis
from quart import Response, jsonify
from schemathesis.core.result import Ok

from api import fields
from api.app import ApiConfig, create_app, openapi_of
from api.fields import OPTION_NAMES, DeclaredBody, UndeclaredFieldError
from api.openapi import JSON, document, endpoint
from api.schemas import generation_options
from runtime.engine.options import SamplingOptions
from tests.api_fakes import FakeRunner

IMPLICIT = {"HEAD", "OPTIONS"}
# The smallest body each POST route answers 200 to (through the fake runner).
BASE_BODIES: dict[str, dict[str, Any]] = {
    "/completion": {"prompt": "hi"},
    "/tokenize": {"content": "hi"},
    "/detokenize": {"tokens": [1]},
    "/api/generate": {"prompt": "hi"},
    "/api/chat": {"messages": [{"role": "user", "content": "hi"}]},
    "/api/show": {"model": "fake"},
    # top_logprobs needs logprobs
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
    "/v1/completions": {"prompt": "hi"},
    "/api/embed": {"input": "hi"},
    "/api/embeddings": {"prompt": "hi"},
    "/v1/embeddings": {"model": "fake", "input": "hi"},
}


@pytest.fixture
def app() -> Any:
    return create_app(FakeRunner(), ApiConfig(model_name="fake:latest"))


@pytest.fixture
async def client(app: Any) -> AsyncIterator[Any]:
    async with app.test_app() as test_app:
        yield test_app.test_client()


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item}


def openapi_path(rule: str) -> str:
    return rule.replace("<path:", "{").replace("<", "{").replace(">", "}")


def test_every_registered_route_is_in_the_document(app: Any) -> None:
    registered = {
        (openapi_path(rule.rule), method)
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - IMPLICIT
    }
    assert operations(openapi_of(app)) == registered
    assert ("/openapi.json", "GET") in registered
    assert ("/metrics", "GET") in registered
    assert not any(path.startswith("/static") for path, _ in registered)


def test_a_route_never_declared_fails_the_document(app: Any) -> None:
    @app.get("/undeclared")
    async def undeclared() -> Response:
        return jsonify({})

    with pytest.raises(LookupError, match="/undeclared"):
        document(app, version="0", api_key=False)


async def test_the_document_is_served_and_schemathesis_reads_every_operation(
    app: Any, client: Any
) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    doc = await response.get_json()
    assert doc == json.loads(json.dumps(openapi_of(app)))
    loaded = list(schemathesis.openapi.from_dict(doc).get_all_operations())
    assert all(isinstance(op, Ok) for op in loaded)
    assert len(loaded) == len(operations(doc))


def test_an_api_key_is_documented_where_it_is_required() -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="fake", api_key="k"))
    doc = openapi_of(app)
    assert "bearer" in doc["components"]["securitySchemes"]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]  # probes need no key
    completion = doc["paths"]["/completion"]["post"]
    assert "401" in completion["responses"]
    assert completion["security"] == [{"bearer": []}]


def test_options_are_the_sampling_options_and_those_generation_options_reads(app: Any) -> None:
    body = openapi_of(app)["paths"]["/completion"]["post"]["requestBody"]
    options = body["content"][JSON]["schema"]["properties"]["options"]["properties"]
    sampling = {a.name for a in attrs.fields(SamplingOptions)}
    assert set(options) == sampling | {"num_predict", "num_ctx", "stop"}
    # Every option generation_options reads is declared (an undeclared read would raise).
    declared = DeclaredBody({"temperature": 0, "num_predict": 3, "stop": ["x"]}, OPTION_NAMES)
    assert generation_options(declared).num_predict == 3


async def test_a_route_reading_a_field_it_did_not_declare_is_a_bug(app: Any) -> None:
    @app.post("/probe")
    @endpoint("probe", body=fields.body(fields.string("declared")))
    async def probe(body: DeclaredBody) -> Response:
        return jsonify({"value": body.get("undeclared")})

    with pytest.raises(UndeclaredFieldError):
        DeclaredBody({"undeclared": 1}, frozenset({"declared"})).get("undeclared")
    async with app.test_app() as test_app:
        response = await test_app.test_client().post("/probe", json={"declared": "x"})
    assert response.status_code == 500


def bounded_fields(doc: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """(path, field, "minimum"/"maximum", bound) of every top-level numeric bound."""
    out = []
    for path, item in doc["paths"].items():
        request_body = item.get("post", {}).get("requestBody")
        if request_body is None:
            continue
        properties = request_body["content"][JSON]["schema"]["properties"]
        for name, schema in properties.items():
            for key in ("minimum", "maximum"):
                if key in schema:
                    out.append((path, name, key, schema[key]))
    return out


async def test_every_documented_bound_is_the_bound_the_route_enforces(
    app: Any, client: Any
) -> None:
    bounds = bounded_fields(openapi_of(app))
    assert len(bounds) > 20
    assert {path for path, *_ in bounds} == set(BASE_BODIES) - {
        "/api/show",
        "/api/embeddings",
        "/tokenize",
        "/detokenize",
    }
    for path, name, key, bound in bounds:
        kind = openapi_of(app)["paths"][path]["post"]["requestBody"]["content"][JSON]
        is_integer = "integer" in kind["schema"]["properties"][name]["type"]
        step = 1 if is_integer else 0.5
        outside = bound - step if key == "minimum" else bound + step
        at = await client.post(path, json={**BASE_BODIES[path], name: bound})
        assert at.status_code == 200, (path, name, bound, await at.get_data())
        beyond = await client.post(path, json={**BASE_BODIES[path], name: outside})
        assert beyond.status_code == 400, (path, name, outside)
