"""Nothing a client sends may produce a 500: random bodies against every POST route."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import ApiConfig, create_app
from tests.api_fakes import FakeRunner

POST_ROUTES = (
    "/completion",
    "/tokenize",
    "/detokenize",
    "/api/generate",
    "/api/chat",
    "/api/show",
    "/v1/completions",
    "/v1/chat/completions",
)
KEYS = (
    "model", "prompt", "messages", "options", "stream", "max_tokens", "logprobs", "top_logprobs",
    "temperature", "top_p", "n", "stop", "seed", "stream_options", "tools", "format", "raw",
    "system", "images", "think", "suffix", "template", "tokens", "content", "response_format",
    "presence_penalty", "frequency_penalty", "max_completion_tokens", "echo", "top_k", "num_ctx",
    "name",
)  # fmt: skip
OPTION_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty", "seed", "num_predict", "stop", "num_ctx", "mirostat",
)  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["fake", "fake:latest", "user", "assistant", "system", "text"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
        optional={"content": json_values, "images": json_values, "tool_calls": json_values},
    ),
    max_size=3,
)
bodies = st.dictionaries(
    st.sampled_from(KEYS),
    json_values | messages | st.dictionaries(st.sampled_from(OPTION_KEYS), json_values, max_size=5),
    max_size=8,
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(route=st.sampled_from(POST_ROUTES), body=bodies | json_values)
async def test_no_body_produces_a_server_error(route: str, body: Any) -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="fake", max_body=1 << 16))
    async with app.test_app() as test_app:
        response = await test_app.test_client().post(
            route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        data = await response.get_data(as_text=False)
    assert response.status_code < 500, data
    if response.status_code >= 400:
        assert isinstance(json.loads(data)["error"], str)


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=64))
async def test_no_raw_bytes_produce_a_server_error(raw: bytes) -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="fake"))
    async with app.test_app() as test_app:
        response = await test_app.test_client().post(
            "/api/chat", data=raw, headers={"Content-Type": "application/json"}
        )
    assert response.status_code < 500
