"""Route-by-route tests with Quart's test client over the scripted fake runner."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from actors.messages import DoneReason, QueueFullError, UnavailableError
from api.app import ApiConfig, context_of, create_app
from runtime.errors import OptionsError, PromptError, PromptTooLongError
from tests.api_fakes import FakeRunner


@pytest.fixture
def fake() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
async def client(fake: FakeRunner) -> AsyncIterator[Any]:
    app = create_app(fake, ApiConfig(model_name="fake:latest", max_body=4096))
    async with app.test_app() as test_app:
        yield test_app.test_client()


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line]


# ---- /completion ----


async def test_completion_streams_ndjson_with_final_statistics(client, fake) -> None:
    response = await client.post("/completion", json={"prompt": "hi"})
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    chunks = lines(await response.get_data())
    assert [c["content"] for c in chunks] == ["Hello", " world", "!", ""]
    assert [c["token"] for c in chunks[:3]] == [1, 2, 3]
    assert not any(c["done"] for c in chunks[:-1])
    last = chunks[-1]
    assert last["done"] is True
    assert last["done_reason"] == 0
    for key in ("prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"):
        assert isinstance(last[key], int)
    assert last["eval_count"] == 3
    assert fake.requests[0].prompt == "hi"
    assert fake.requests[0].template is False


async def test_completion_without_stream_returns_one_object(client) -> None:
    response = await client.post("/completion", json={"prompt": "hi", "stream": False})
    body = await response.get_json()
    assert body["content"] == "Hello world!"
    assert body["tokens"] == [1, 2, 3]
    assert body["done"] is True
    assert body["done_reason"] == 0


async def test_max_tokens_is_an_alias_of_num_predict(client, fake) -> None:
    response = await client.post(
        "/completion", json={"prompt": "hi", "max_tokens": 2, "stream": False}
    )
    body = await response.get_json()
    assert fake.requests[0].options.num_predict == 2
    assert body["content"] == "Hello world"
    assert body["done_reason"] == int(DoneReason.LENGTH) == 1


async def test_completion_options_and_token_prompt(client, fake) -> None:
    options = {"temperature": 0, "top_k": 5, "seed": 7, "stop": ["\n"], "num_ctx": 32}
    response = await client.post(
        "/completion", json={"prompt": [1, 2, 3], "options": options, "stream": False}
    )
    assert response.status_code == 200
    request = fake.requests[0]
    assert request.tokens == (1, 2, 3)
    assert request.prompt is None
    assert request.options.sampling.temperature == 0
    assert request.options.sampling.top_k == 5
    assert request.options.sampling.seed == 7
    assert request.options.stop == ("\n",)
    assert request.options.num_ctx == 32


async def test_completion_logprobs(client) -> None:
    body = {"prompt": "hi", "logprobs": True, "top_logprobs": 2}
    chunks = lines(await (await client.post("/completion", json=body)).get_data())
    first = chunks[0]["logprobs"][0]
    assert first["token"] == "Hello"
    assert first["logprob"] == -0.5
    assert [t["token"] for t in first["top_logprobs"]] == ["alt0", "alt1"]


# ---- /health, /tokenize, /detokenize, /metrics ----


async def test_health_reports_loading_ready_and_draining(client, fake) -> None:
    fake.state = "loading"
    fake.progress = 0.42
    response = await client.get("/health")
    assert response.status_code == 503
    assert await response.get_json() == {"status": "loading", "progress": 0.42}
    assert response.headers["Retry-After"]
    fake.state = "ok"
    response = await client.get("/health")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok"}
    context_of(client.app).draining = True
    response = await client.get("/health")
    assert response.status_code == 503
    assert await response.get_json() == {"status": "shutting_down"}


async def test_tokenize_and_detokenize(client) -> None:
    response = await client.post("/tokenize", json={"content": "ab cde"})
    assert await response.get_json() == {"tokens": [2, 3]}
    response = await client.post("/detokenize", json={"tokens": [2, 3]})
    assert await response.get_json() == {"content": "<2> <3>"}
    response = await client.post("/detokenize", json={"tokens": [-1]})
    assert response.status_code == 400
    response = await client.post("/detokenize", json={"tokens": "abc"})
    assert response.status_code == 400
    response = await client.post("/detokenize", json={"tokens": [2**40]})
    assert response.status_code == 400


async def test_the_choices_of_one_request_count_its_prompt_once(client) -> None:
    body = {"model": "fake", "prompt": "hi", "n": 3}
    reply = await (await client.post("/v1/completions", json=body)).get_json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    text = (await (await client.get("/metrics")).get_data()).decode()
    assert "mlxrunner_prompt_tokens_total 5.0" in text
    assert "mlxrunner_generated_tokens_total 9.0" in text


async def test_metrics_exposes_counters_histograms_and_runner_state(client) -> None:
    await client.post("/completion", json={"prompt": "hi"})
    await client.post("/completion", data=b"{", headers={"Content-Type": "application/json"})
    text = (await (await client.get("/metrics")).get_data()).decode()
    assert (
        'mlxrunner_http_requests_total{method="POST",route="/completion",status="200"} 1.0' in text
    )
    assert 'status="400"' in text
    assert "mlxrunner_generated_tokens_total 3.0" in text
    assert "mlxrunner_prompt_tokens_total 5.0" in text
    assert "mlxrunner_time_to_first_token_seconds_count 1.0" in text
    assert "mlxrunner_token_latency_seconds_count 2.0" in text
    for name in (
        "mlxrunner_queue_depth",
        "mlxrunner_active_sequences",
        "mlxrunner_cache_bytes",
        "mlxrunner_cache_hit_ratio 0.25",
        "mlxrunner_cancellations_total",
        "mlxrunner_paused_sequences 0.0",
        "mlxrunner_open_generations 0.0",
    ):
        assert name in text


# ---- errors ----


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": 3}', "prompt"),
        (b'{"prompt": "x", "options": {"temperature": "hot"}}', "temperature"),
        (b'{"prompt": "x", "options": {"top_p": 2}}', "top_p"),
        (b'{"prompt": "x", "options": {"top_k": -1}}', "top_k"),
        (b'{"prompt": "x", "options": {"top_k": true}}', "top_k"),
        (b'{"prompt": "x", "options": {"temperature": NaN}}', "NaN"),
        (b'{"prompt": "x", "options": {"stop": [1]}}', "stop"),
        (b'{"prompt": "x", "options": {"num_ctx": 0}}', "num_ctx"),
        (b'{"prompt": "x", "options": "fast"}', "options"),
        (b'{"prompt": "x", "stream": "yes"}', "stream"),
        (b'{"prompt": "x", "top_logprobs": 99}', "top_logprobs"),
        (b'{"prompt": "x", "options": {"top_k": 100000000000000000000}}', "top_k"),
        (b'{"prompt": "\\ud800"}', "unicode"),
        (b'{"prompt": "\xff"}', "UTF-8"),
        (b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    ],
)
async def test_bad_requests_are_400_with_a_json_error(client, body, needle) -> None:
    response = await client.post(
        "/completion", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    payload = await response.get_json()
    assert needle in payload["error"]


async def test_unknown_route_and_model_are_404(client) -> None:
    response = await client.get("/no/such/route")
    assert response.status_code == 404
    assert "error" in await response.get_json()
    response = await client.post("/api/generate", json={"model": "other", "prompt": "x"})
    assert response.status_code == 404
    assert "other" in (await response.get_json())["error"]
    response = await client.get("/completion")
    assert response.status_code == 405
    assert "error" in await response.get_json()


async def test_body_over_max_body_is_413(client) -> None:
    response = await client.post("/completion", json={"prompt": "x" * 5000})
    assert response.status_code == 413
    assert "error" in await response.get_json()


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (
            PromptTooLongError("input length (99 tokens) exceeds the context length (64 tokens)"),
            413,
            False,
        ),
        (PromptError("empty prompt"), 400, False),
        (OptionsError("top_p must be in (0, 1]"), 400, False),
        (QueueFullError("queue full (64 waiting)"), 429, True),
        (UnavailableError("loading", state="loading"), 503, True),
        (UnavailableError("draining", state="shutting_down"), 503, True),
    ],
)
async def test_runner_errors_on_entry_map_to_statuses(client, fake, error, status, retry_after):
    fake.entry_error = error
    for path, body in (
        ("/completion", {"prompt": "x"}),
        ("/api/generate", {"model": "fake", "prompt": "x"}),
        ("/v1/completions", {"model": "fake", "prompt": "x", "stream": True}),
    ):
        response = await client.post(path, json=body)
        assert response.status_code == status, path
        assert (await response.get_json())["error"] == str(error)
        assert ("Retry-After" in response.headers) == retry_after


async def test_draining_refuses_new_generations_with_503(client) -> None:
    context_of(client.app).draining = True
    response = await client.post("/completion", json={"prompt": "x"})
    assert response.status_code == 503
    assert response.headers["Retry-After"]


async def test_api_key_is_required_when_set(fake) -> None:
    app = create_app(fake, ApiConfig(model_name="fake", api_key="s3cret"))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/completion", json={"prompt": "x"})
        assert response.status_code == 401
        assert "error" in await response.get_json()
        wrong = {"Authorization": "Bearer nope"}
        response = await client.post("/completion", json={"prompt": "x"}, headers=wrong)
        assert response.status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        response = await client.post("/completion", json={"prompt": "x"}, headers=right)
        assert response.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401


async def test_long_stream_outlives_quarts_default_response_timeout(fake, autojump_clock) -> None:
    async def slow_step() -> None:
        await trio.sleep(30)  # 30 virtual seconds per token: 90 s in all, over Quart's 60 s

    fake.step = slow_step
    app = create_app(fake, ApiConfig(model_name="fake"))
    # Virtual time: a cut stream never completes, and this deadline turns that into a failure.
    with trio.fail_after(3600):
        async with app.test_app() as test_app:
            response = await test_app.test_client().post("/completion", json={"prompt": "x"})
            chunks = lines(await response.get_data(as_text=False))
    assert chunks[-1]["done"] is True
    assert "".join(c["content"] for c in chunks) == "Hello world!"


async def test_a_generation_dropped_unread_is_still_closed(fake) -> None:
    import gc

    from actors.messages import GenerateRequest
    from api.generation import open_generation

    fake.endless = True
    app = create_app(fake, ApiConfig(model_name="fake"))
    generation = await open_generation(context_of(app), GenerateRequest(prompt="x"))
    assert fake.active == 1
    del generation  # as when a client leaves before the response body is iterated
    gc.collect()
    await trio.testing.wait_all_tasks_blocked()  # the loop runs the close it was handed
    assert fake.active == 0
    assert fake.cancelled == 1


async def test_a_runner_fault_after_admission_ends_the_stream_with_an_error(
    client, fake, caplog
) -> None:
    """The client learns that the server failed and under which id; only the log says why."""
    fake.fail_at = 1

    def generic(error: str, response: Any) -> str:
        rid = response.headers["X-Request-Id"]
        assert error == f"internal error (request id {rid})"
        assert f"request {rid} failed: GenerationError: engine failed" in caplog.text
        return rid

    response = await client.post("/completion", json={"prompt": "x"})
    chunks = lines(await response.get_data())
    assert chunks[0]["content"] == "Hello"
    assert chunks[-1]["request_id"] == generic(chunks[-1]["error"], response)
    response = await client.post("/api/chat", json={"messages": [{"role": "user", "content": "x"}]})
    last = lines(await response.get_data())[-1]
    assert last["request_id"] == generic(last["error"], response)
    response = await client.post(
        "/v1/completions", json={"model": "fake", "prompt": "x", "stream": True}
    )
    data = (await response.get_data()).decode()
    assert "[DONE]" not in data
    event = json.loads(data.split("data: ")[-1])
    assert event["error"]["type"] == "server_error"
    assert event["error"]["request_id"] == generic(event["error"]["message"], response)
    response = await client.post("/completion", json={"prompt": "x", "stream": False})
    assert response.status_code == 500
    body = await response.get_json()
    assert body["request_id"] == generic(body["error"], response)
    assert "engine failed" not in json.dumps(body)
    assert fake.active == 0


async def test_ollama_empty_prompt_loads_without_generating(client, fake) -> None:
    for path, body in (
        ("/api/generate", {"model": "fake"}),
        ("/api/chat", {"model": "fake", "messages": []}),
    ):
        reply = await (await client.post(path, json=body)).get_json()
        assert reply["done"] is True
        assert reply["done_reason"] == "load"
    assert fake.requests == []


async def test_ollama_logprobs_and_raw(client, fake) -> None:
    body = {"model": "fake", "prompt": "x", "raw": True, "logprobs": True, "top_logprobs": 1}
    chunks = lines(await (await client.post("/api/generate", json=body)).get_data())
    assert chunks[0]["logprobs"][0]["token"] == "Hello"
    assert chunks[0]["logprobs"][0]["top_logprobs"][0]["token"] == "alt0"
    assert fake.requests[0].template is False


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "fake", "prompt": "x", "format": "yaml"}),
        ("/api/chat", {"model": "fake", "messages": [{"role": "user"}], "format": ["json"]}),
        ("/completion", {"prompt": "x", "format": 3}),
        ("/api/generate", {"model": "fake", "prompt": "x", "images": ["aGk="]}),
        ("/api/chat", {"model": "fake", "messages": [{"role": "user", "images": ["aGk="]}]}),
        ("/api/chat", {"model": "fake", "messages": [{"role": "user"}], "think": True}),
        ("/api/chat", {"model": "fake", "messages": "hi"}),
        ("/v1/chat/completions", {"model": "fake", "messages": []}),
        ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user"}], "n": 17}),
        (
            "/v1/chat/completions",
            {
                "model": "fake",
                "messages": [{"role": "user"}],
                "response_format": {"type": "xml"},
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": "fake",
                "messages": [{"role": "user"}],
                "response_format": {"type": "json_schema"},
            },
        ),
        (
            "/v1/completions",
            {
                "model": "fake",
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}, "strict": "yes"},
                },
            },
        ),
        (
            "/v1/chat/completions",
            {"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        ),
        (
            "/v1/chat/completions",
            {"model": "fake", "messages": [{"role": "user"}], "top_logprobs": 2},
        ),
        ("/v1/completions", {"model": "fake", "prompt": "x", "echo": True, "logprobs": 1}),
        ("/v1/completions", {"model": "fake", "prompt": "x", "best_of": 2}),
        ("/v1/completions", {"model": "fake", "prompt": "x", "suffix": "y"}),
        ("/v1/completions", {"model": "fake", "prompt": "x", "logit_bias": {"1": 101}}),
        ("/v1/chat/completions", {"model": "fake", "messages": [], "logit_bias": {"a": 1}}),
        ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 0}),
        ("/v1/completions", {"model": "fake", "prompt": ["a", "b"]}),
        ("/v1/completions", {"model": "fake", "prompt": "x", "logprobs": 6}),
    ],
)
async def test_unsupported_or_invalid_requests_are_400(client, fake, path, body) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 400
    assert isinstance((await response.get_json())["error"], str)
    assert fake.requests == []
