"""OpenAI request features through the official ``openai`` client, unchanged, against the real
server over a tiny model: logit_bias, echo, and the 400s of best_of/suffix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.live_server import MODEL_NAME, Live, ServerThread, make_model, open_live_server

GREEDY: dict[str, Any] = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 5}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = make_model(tmp_path_factory.mktemp("features") / "tiny")
    with ServerThread(lambda: open_live_server(folder)) as server:
        yield server


@pytest.fixture
def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)


def test_logit_bias_forces_a_token_and_logprobs_are_of_the_biased_logits(client) -> None:
    forced = client.completions.create(
        prompt="once upon", logit_bias={"42": 100}, logprobs=1, **GREEDY
    )
    choice = forced.choices[0]
    assert choice.logprobs is not None
    tokens = choice.logprobs.tokens
    assert tokens is not None
    assert len(tokens) == 5
    assert len(set(tokens)) == 1
    assert all(lp is not None and lp > -1e-3 for lp in choice.logprobs.token_logprobs or [])
    plain = client.completions.create(prompt="once upon", logprobs=1, **GREEDY)
    assert plain.choices[0].logprobs is not None
    assert plain.choices[0].logprobs.tokens != tokens
    # Sampled rows too, and on the chat route.
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}],
        logit_bias={"42": 100},
        logprobs=True,
        **{**GREEDY, "temperature": 1.0, "seed": 3},
    )
    assert chat.choices[0].logprobs is not None
    content = chat.choices[0].logprobs.content or []
    assert [c.token for c in content] == [tokens[0]] * 5


@pytest.mark.parametrize(
    "bias",
    [{"1000000": 1}, {"5": 101}, {"x": 1}, {str(i): 1 for i in range(301)}],
)
def test_bad_logit_bias_is_400(client, bias: dict[str, int]) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(prompt="hi", logit_bias=bias, **GREEDY)


def test_echo_puts_the_prompt_before_the_completion(client) -> None:
    plain = client.completions.create(prompt="once upon", **GREEDY).choices[0].text
    echoed = client.completions.create(prompt="once upon", echo=True, **GREEDY).choices[0]
    assert echoed.text == "once upon" + plain
    parts = list(client.completions.create(prompt="once upon", echo=True, stream=True, **GREEDY))
    assert parts[0].choices[0].text.startswith("once upon")
    assert "".join(p.choices[0].text for p in parts if p.choices) == "once upon" + plain


@pytest.mark.parametrize(
    "extra",
    [
        {"echo": True, "logprobs": 1},  # prompt logprobs are not computed
        {"echo": True, "prompt": [5, 6, 7]},
        {"best_of": 2},
        {"suffix": "and so on"},
    ],
)
def test_unsupported_completion_options_are_400(client, extra: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"prompt": "hi", **GREEDY, **extra})
    message = info.value.response.json()["error"]
    assert "not supported" in message or "echo" in message


def test_best_of_equal_to_n_is_accepted(client) -> None:
    reply = client.completions.create(prompt="hi", best_of=1, **GREEDY)
    assert len(reply.choices) == 1
