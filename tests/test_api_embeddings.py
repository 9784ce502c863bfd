"""The embedding routes with the official ``ollama`` and ``openai`` clients, unchanged, against
the real server over the tiny model: the vectors equal a direct computation on the same model."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from runtime.engine.embedding import embed_tokens
from runtime.models.loader import LoadedModel, load_model
from tests.live_server import CONTEXT, Live, ServerThread, make_model, open_live_server


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("embed") / "m")


@pytest.fixture(scope="module")
def live(folder: Path) -> Iterator[Live]:
    with ServerThread(lambda: open_live_server(folder)) as server:
        yield server


@pytest.fixture(scope="module")
def direct(folder: Path) -> LoadedModel:
    return load_model(folder)


def expected(loaded: LoadedModel, text: str, *, normalize: bool = True) -> list[float]:
    tokens = loaded.tokenizer.encode(text)
    vocab = int(loaded.model.args.vocab_size)
    return embed_tokens(loaded.model, [tokens], vocab_size=vocab, normalize=normalize)[0]


def norm(vector: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def test_ollama_embed_a_text_and_a_list(live: Live, direct: LoadedModel) -> None:
    client = ollama.Client(host=live.url)
    one = client.embed(model="tiny", input="the sky is blue")
    assert one.model == "tiny"
    assert len(one.embeddings) == 1
    assert one.embeddings[0] == pytest.approx(expected(direct, "the sky is blue"), abs=1e-4)
    assert one.prompt_eval_count == len(direct.tokenizer.encode("the sky is blue"))
    texts = ["a", "a much longer text than the first one", "b c"]
    many = client.embed(model="tiny", input=texts)
    assert len(many.embeddings) == 3
    for text, vector in zip(texts, many.embeddings, strict=True):
        assert norm(vector) == pytest.approx(1.0, abs=1e-5)
        assert vector == pytest.approx(expected(direct, text), abs=1e-4)
    assert many.total_duration is not None
    assert many.total_duration > 0
    assert client.embed(model="tiny", input=[]).embeddings == []


def test_ollama_legacy_embeddings_are_not_normalised(live: Live, direct: LoadedModel) -> None:
    client = ollama.Client(host=live.url)
    result = client.embeddings(model="tiny", prompt="hello there")
    assert list(result.embedding) == pytest.approx(
        expected(direct, "hello there", normalize=False), abs=1e-4
    )
    assert client.embeddings(model="tiny", prompt="").embedding == []


def test_truncate_cuts_long_inputs_or_refuses_them(live: Live) -> None:
    client = ollama.Client(host=live.url)
    long_text = " ".join(f"w{i}" for i in range(3 * CONTEXT))
    cut = client.embed(model="tiny", input=long_text)
    assert cut.prompt_eval_count == CONTEXT
    assert norm(cut.embeddings[0]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="tiny", input=long_text, truncate=False)
    assert refused.value.status_code == 400
    assert "context length" in refused.value.error


def test_openai_floats_base64_tokens_and_usage(live: Live, direct: LoadedModel) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    texts = ["first text", "second, longer text"]
    floats = client.embeddings.create(model="tiny", input=texts)
    assert floats.object == "list"
    assert floats.model == "tiny"
    assert [d.index for d in floats.data] == [0, 1]
    for text, item in zip(texts, floats.data, strict=True):
        assert item.object == "embedding"
        assert item.embedding == pytest.approx(expected(direct, text), abs=1e-4)
    tokens = sum(len(direct.tokenizer.encode(t)) for t in texts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    # Without encoding_format the client asks for base64 and decodes it; asked explicitly, it
    # hands the string back.
    b64 = client.embeddings.create(model="tiny", input=texts, encoding_format="base64")
    as_float = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    for a, b, c in zip(floats.data, b64.data, as_float.data, strict=True):
        assert isinstance(b.embedding, str)
        data = base64.b64decode(b.embedding)
        assert list(struct.unpack(f"<{len(data) // 4}f", data)) == pytest.approx(a.embedding)
        assert c.embedding == pytest.approx(a.embedding, abs=1e-6)
    ids = direct.tokenizer.encode("first text")
    by_ids = client.embeddings.create(model="tiny", input=[ids, ids[:1]])
    assert by_ids.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert client.embeddings.create(model="tiny", input=ids).usage.prompt_tokens == len(ids)


def test_openai_base64_is_little_endian_float32(live: Live) -> None:
    import httpx

    body: dict[str, Any] = {"model": "tiny", "input": "bytes"}
    floats = httpx.post(f"{live.url}/v1/embeddings", json=body).json()
    raw = httpx.post(f"{live.url}/v1/embeddings", json={**body, "encoding_format": "base64"})
    data = base64.b64decode(raw.json()["data"][0]["embedding"])
    values = struct.unpack(f"<{len(data) // 4}f", data)
    assert list(values) == pytest.approx(floats["data"][0]["embedding"], abs=1e-7)


def test_dimensions_keeps_a_prefix_renormalised(live: Live, direct: LoadedModel) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    short = client.embeddings.create(model="tiny", input="abc", dimensions=8).data[0].embedding
    raw = expected(direct, "abc", normalize=False)[:8]
    assert short == pytest.approx([x / norm(raw) for x in raw], abs=1e-4)
    size = int(direct.model.args.hidden_size)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input="abc", dimensions=size + 1)
    assert "dimensions" in str(refused.value.body)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ([[10**6]], "vocabulary"),
        ("", "empty"),
        (["x"] * 2049, "more than 2048"),
        (["x", 3], "items must be"),
    ],
)
def test_bad_inputs_get_a_clear_400(live: Live, given: Any, says: str) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input=given)
    assert says in str(refused.value.body)


def test_an_unknown_model_is_404(live: Live) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
