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


SAMPLED: dict[str, Any] = {"model": MODEL_NAME, "temperature": 1.0, "max_tokens": 6, "seed": 5}


def test_n_choices_are_distinct_reproducible_and_counted_once_for_the_prompt(client) -> None:
    reply = client.completions.create(prompt="once upon", n=3, logprobs=0, **SAMPLED)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.text for c in reply.choices]
    assert len(set(texts)) == 3
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    again = client.completions.create(prompt="once upon", n=3, logprobs=0, **SAMPLED)
    assert [c.text for c in again.choices] == texts
    # Choice i draws with seed + i.
    for i in (0, 2):
        one = client.completions.create(
            prompt="once upon", logprobs=0, **{**SAMPLED, "seed": 5 + i}
        )
        assert one.choices[0].text == texts[i]
        assert reply.usage is not None
        assert one.usage is not None
        assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    assert reply.usage is not None
    counts = [len(c.logprobs.tokens or []) for c in reply.choices if c.logprobs is not None]
    assert reply.usage.completion_tokens == sum(counts)


def test_n_choices_stream_tagged_with_their_index(client) -> None:
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(messages=messages, n=2, **SAMPLED)
    parts = list(
        client.chat.completions.create(
            messages=messages,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            **SAMPLED,
        )
    )
    text = {0: "", 1: ""}
    finish = {}
    for part in parts:
        for choice in part.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert text == {c.index: c.message.content for c in whole.choices}
    assert text[0] != text[1]
    assert set(finish) == {0, 1}
    assert parts[-1].usage is not None
    assert whole.usage is not None
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_with_echo_and_logit_bias_apply_to_every_choice(client) -> None:
    reply = client.completions.create(
        prompt="once upon", n=2, echo=True, logit_bias={"42": 100}, **SAMPLED
    )
    texts = [c.text for c in reply.choices]
    assert texts[0] == texts[1]
    assert texts[0].startswith("once upon")


def test_n_past_the_bound_and_best_of_other_than_n_are_400(client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(prompt="hi", n=17, **GREEDY)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(prompt="hi", n=2, best_of=3, **GREEDY)
    assert len(client.completions.create(prompt="hi", n=2, best_of=2, **GREEDY).choices) == 2


def test_n_choices_compute_the_prompt_once(live: Live, client) -> None:
    # A prompt no other test sends: the prefix cache has (almost) none of it.
    prompt = " ".join(f"w{i}x" for i in range(60))
    before = live.statistics()
    reply = client.completions.create(prompt=prompt, n=4, **SAMPLED)
    after = live.statistics()
    assert reply.usage is not None
    prompt_tokens = reply.usage.prompt_tokens
    assert prompt_tokens > 40
    assert after.prompt_tokens_total - before.prompt_tokens_total == 4 * prompt_tokens
    computed = after.prefilled_tokens_total - before.prefilled_tokens_total
    assert computed <= prompt_tokens + 3  # each other choice computes only the last position
    assert computed > prompt_tokens // 2
