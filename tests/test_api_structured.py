"""Structured output end to end: the official ``ollama`` and ``openai`` clients, unchanged,
against the real server. The tiny model (random weights) checks the shapes of every route and
field; the default model (SmolLM2, when its package is installed) checks that what a real
model writes under a schema is valid JSON that matches it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import jsonschema_rs
import ollama
import openai
import pydantic
import pytest

from tests.live_server import MODEL_NAME, Live, ServerThread, make_model, open_live_server

GREEDY: dict[str, Any] = {"temperature": 0, "seed": 1}


class Shirt(pydantic.BaseModel):
    in_stock: bool
    size: Literal["S", "M", "L"]


SHIRT = Shirt.model_json_schema()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = make_model(tmp_path_factory.mktemp("structured") / "tiny")
    with ServerThread(lambda: open_live_server(folder)) as server:
        yield server


@pytest.fixture
def oai(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)


@pytest.fixture
def oll(live: Live) -> ollama.Client:
    return ollama.Client(host=live.url)


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def _strict(name: str, schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ---- Ollama: format ----


def test_ollama_format_schema_whole_and_streamed(oll: ollama.Client) -> None:
    whole = oll.generate(model=MODEL_NAME, prompt="a shirt", format=SHIRT, options=GREEDY)
    assert whole.done_reason == "stop"
    assert Shirt.model_validate_json(whole.response or "")
    parts = list(
        oll.chat(
            model=MODEL_NAME,
            messages=_user("a shirt"),
            format=SHIRT,
            stream=True,
            options={"temperature": 1.5, "seed": 5},
        )
    )
    assert parts[-1].done_reason == "stop"
    assert Shirt.model_validate_json("".join(p.message.content or "" for p in parts))


def test_ollama_format_json_cut_by_length_says_so(oll: ollama.Client) -> None:
    """ "json" is any object; the tiny model's one runs on until num_predict cuts it."""
    cut = oll.chat(
        model=MODEL_NAME,
        messages=_user("hi"),
        format="json",
        options={**GREEDY, "num_predict": 6},
    )
    assert cut.done_reason == "length"
    assert (cut.message.content or "").lstrip().startswith("{")
    plain = oll.chat(model=MODEL_NAME, messages=_user("hi"), options={**GREEDY, "num_predict": 6})
    assert not (plain.message.content or "").lstrip().startswith("{")


def test_native_completion_takes_format(live: Live) -> None:
    import httpx

    body = {"prompt": "x", "format": SHIRT, "stream": False, "options": GREEDY}
    reply = httpx.post(f"{live.url}/completion", json=body, timeout=60).json()
    assert reply["done_reason"] == 0
    assert Shirt.model_validate_json(reply["content"])


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "nope"}, "Invalid type: nope"),
        ({"type": "string", "pattern": "("}, "unclosed group"),
        ({"$ref": "#/$defs/Missing"}, "does not exist"),
    ],
)
def test_ollama_invalid_schema_is_400_saying_why(
    oll: ollama.Client, schema: dict[str, Any], says: str
) -> None:
    with pytest.raises(ollama.ResponseError, match=says) as caught:
        oll.generate(model=MODEL_NAME, prompt="x", format=schema)
    assert caught.value.status_code == 400


# ---- OpenAI: response_format ----


def test_openai_parse_with_a_pydantic_model(oai: openai.OpenAI) -> None:
    """The client's ``parse`` sends a strict json_schema and parses the reply itself."""
    done = oai.chat.completions.parse(
        model=MODEL_NAME, messages=_user("a shirt"), response_format=Shirt, **GREEDY
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Shirt)


def test_openai_json_schema_with_n_choices_streamed(oai: openai.OpenAI) -> None:
    """Each choice has its own grammar state (n=3, sampled, streamed)."""
    stream = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=_user("a shirt"),
        response_format=_strict("shirt", SHIRT),
        n=3,
        temperature=1.5,
        seed=11,
        stream=True,
    )
    texts = ["", "", ""]
    reasons: list[str | None] = [None, None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop"] * 3
    for text in texts:
        Shirt.model_validate_json(text)


def test_openai_json_object_on_completions_cut_by_length(oai: openai.OpenAI) -> None:
    done = oai.completions.create(
        model=MODEL_NAME,
        prompt="x",
        max_tokens=4,
        extra_body={"response_format": {"type": "json_object"}},
        **GREEDY,
    )
    assert done.choices[0].finish_reason == "length"
    assert done.choices[0].text.lstrip().startswith("{")


def test_openai_strict_refuses_what_it_cannot_enforce(oai: openai.OpenAI) -> None:
    odd = {"type": "object", "properties": {"a": {"type": "string", "format": "shoe-size"}}}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "odd", "schema": odd}}
    fmt["json_schema"]["strict"] = True
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=MODEL_NAME,
            messages=_user("x"),
            response_format=fmt,
            max_tokens=4,
        )
    assert "Unknown format: shoe-size" in refused.value.response.json()["error"]
    fmt["json_schema"]["strict"] = False
    lenient = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=_user("x"),
        response_format=fmt,
        max_tokens=4,
    )
    assert (lenient.choices[0].message.content or "").lstrip().startswith("{")


# ---- the default model: real JSON ----

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "landmarks": {
            "type": "array",
            "items": {"type": "string", "maxLength": 30},
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["city", "country", "landmarks"],
}


@pytest.fixture(scope="module")
def default_live(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[Live]:
    # A link in a folder of the test's own, so the server's store is made there.
    link = tmp_path_factory.mktemp("default") / default_gguf.name
    link.symlink_to(default_gguf)
    with ServerThread(lambda: open_live_server(link, prefill_chunk=256)) as server:
        yield server


def test_default_model_writes_json_matching_the_schema(default_live: Live) -> None:
    """Both clients at once (one batch: the model is slow on a CPU), greedy and sampled."""
    oll = ollama.Client(host=default_live.url)
    oai = openai.OpenAI(base_url=f"{default_live.url}/v1", api_key="x", max_retries=0)

    def ollama_reply() -> tuple[str | None, str]:
        reply = oll.chat(
            model=MODEL_NAME,
            messages=_user("Describe Paris as JSON."),
            format=CITY,
            options={**GREEDY, "num_predict": 150},
        )
        return reply.done_reason, reply.message.content or ""

    def openai_reply() -> tuple[str | None, str]:
        done = oai.chat.completions.create(
            model=MODEL_NAME,
            messages=_user("Describe Tokyo as JSON."),
            response_format=_strict("city", CITY),
            max_tokens=150,
            temperature=0.8,
            seed=4,
        )
        return done.choices[0].finish_reason, done.choices[0].message.content or ""

    with ThreadPoolExecutor(2) as pool:
        replies = [f.result() for f in [pool.submit(ollama_reply), pool.submit(openai_reply)]]
    validator = jsonschema_rs.validator_for({**CITY, "additionalProperties": False})
    for reason, text in replies:
        assert reason == "stop", text
        validator.validate(json.loads(text))


# ---- OpenAI: a forced tool call ----

UNIT_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "set_unit",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["C", "F"]}},
            "required": ["unit"],
        },
    },
}
MODE_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "set_mode",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
        },
    },
}


@pytest.fixture(scope="module")
def qwen_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A tiny Qwen2 whose template renders tools and whose calls are ``<tool_call>`` blocks."""
    from runtime.testing.models import make_tiny_folder
    from runtime.testing.tokenizers import tokenizer_config
    from tests.test_api_tools import QWEN_TEMPLATE

    folder = make_tiny_folder(
        tmp_path_factory.mktemp("qwen") / "tiny",
        "qwen2",
        tokenizer_config=tokenizer_config(chat_template=QWEN_TEMPLATE),
        max_position_embeddings=1024,
    )
    with ServerThread(lambda: open_live_server(folder)) as server:
        yield server


def test_tool_choice_required_and_named_force_a_call(qwen_live: Live) -> None:
    client = openai.OpenAI(base_url=f"{qwen_live.url}/v1", api_key="x", max_retries=0)
    ask = _user("Set it.")
    free = client.chat.completions.create(
        model=MODEL_NAME, messages=ask, tools=[UNIT_TOOL, MODE_TOOL], max_tokens=30, **GREEDY
    )
    assert free.choices[0].message.tool_calls is None  # a random model calls nothing itself
    forcing: list[tuple[Any, set[str]]] = [
        ("required", {"set_unit", "set_mode"}),
        ({"type": "function", "function": {"name": "set_mode"}}, {"set_mode"}),
    ]
    for choice, names in forcing:
        done = client.chat.completions.create(
            model=MODEL_NAME,
            messages=ask,
            tools=[UNIT_TOOL, MODE_TOOL],
            tool_choice=choice,
            max_tokens=200,
            temperature=1.5,
            seed=2,
        )
        message = done.choices[0].message
        assert message.tool_calls, message.content
        (call,) = message.tool_calls
        assert call.type == "function"
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        if call.function.name == "set_mode":
            assert isinstance(arguments["on"], bool)
        else:
            assert arguments["unit"] in ("C", "F")
        assert done.choices[0].finish_reason == "tool_calls"


def test_a_forced_call_on_a_llama_is_its_json_call(oai: openai.OpenAI) -> None:
    """A Llama model's calls are bare JSON with "parameters" (its own format)."""
    done = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=_user("Set it."),
        tools=[UNIT_TOOL],
        tool_choice="required",
        max_tokens=200,
        **GREEDY,
    )
    (call,) = done.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "set_unit"
    assert json.loads(call.function.arguments)["unit"] in ("C", "F")
