"""A generation that ends inside a multi-byte character (cut by the token budget, EOS or a
stop string) drops the unfinished character, as Ollama does: no U+FFFD, on the actor tree and
over HTTP, streamed or whole."""

from __future__ import annotations

import functools
from typing import Any

import ollama
import openai
import pytest
import trio

from actors.messages import DoneReason, GenerationOptions
from actors.testing import ScriptedEngine, open_test_runner, tiny_tokenizer
from api.app import ApiConfig, create_app
from tests.api_fakes import serve_app


@functools.cache
def tokenizer() -> Any:
    return tiny_tokenizer()


def cut_character() -> list[int]:
    """Tokens of "Hi " and the first bytes (not all) of a character spelled in byte tokens."""
    tok = tokenizer()
    ids = tok.encode("Hi 鱻")
    head = tok.encode("Hi ")
    assert ids[: len(head)] == head
    assert len(ids) - len(head) > 1
    assert tok.decode(ids[:-1]).endswith("\ufffd")
    return ids[:-1]


def _ends(tok: Any) -> dict[str, tuple[list[int], GenerationOptions, DoneReason]]:
    eos = min(tok.eos_ids)
    return {
        "length": (cut_character(), GenerationOptions(), DoneReason.LENGTH),
        "eos": ([*cut_character(), eos], GenerationOptions(), DoneReason.STOP),
        "stop": (
            [*cut_character(), *tok.encode("STOP more")],
            GenerationOptions(stop=("STOP",)),
            DoneReason.STOP,
        ),
    }


@pytest.mark.parametrize("end", ["length", "eos", "stop"])
async def test_unfinished_character_is_dropped_at_every_end(end: str) -> None:
    tok = tokenizer()
    script, options, reason = _ends(tok)[end]
    engine = ScriptedEngine(lambda r: script, eos=min(tok.eos_ids))
    async with open_test_runner(engine, tokenizer=tok) as client:
        text, last = await client.generate_text("x", options=options)
    assert text == "Hi "
    assert last.done_reason is reason


@pytest.mark.parametrize("stream", [True, False])
async def test_unfinished_character_never_reaches_http(stream: bool) -> None:
    script = cut_character()
    engine = ScriptedEngine(lambda r: script)
    async with open_test_runner(engine, tokenizer=tokenizer()) as harness:
        app = create_app(harness.runner, ApiConfig(model_name="fake"))
        async with serve_app(app) as (host, port):
            url = f"http://{host}:{port}"

            def ollama_text() -> str:
                client = ollama.Client(host=url)
                if stream:
                    parts = list(client.generate(model="fake", prompt="x", raw=True, stream=True))
                    assert parts[-1].done_reason == "length"
                    return "".join(p.response or "" for p in parts)
                return str(client.generate(model="fake", prompt="x", raw=True).response)

            def openai_text() -> str:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                if stream:
                    parts = list(client.completions.create(model="fake", prompt="x", stream=True))
                    return "".join(p.choices[0].text for p in parts if p.choices)
                return str(client.completions.create(model="fake", prompt="x").choices[0].text)

            assert await trio.to_thread.run_sync(ollama_text) == "Hi "
            assert await trio.to_thread.run_sync(openai_text) == "Hi "
