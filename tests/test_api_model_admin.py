"""``/api/create``, ``/api/copy`` and ``/api/delete`` (``api/model_admin.py``) over a store
in a temp folder: through the official ``ollama`` client where it has a call for them, and
the served model's profile applied to the generation routes (``api/model_defaults.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import ollama
import pytest
import trio

from actors import import_process
from actors.messages import ModelInfo
from actors.tree import open_runner
from api.app import ApiConfig, create_app
from runtime.store.layout import Store
from runtime.store.profile import ModelProfile
from runtime.testing.models import random_weights, tiny_config
from runtime.text.tokenizer import Tokenizer
from tests import gguf_writer as gw
from tests.api_fakes import INFO, FakeRunner, raw_request, serve_app
from tests.waits import read_until, wait_until

JINJA = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture
async def url(store: Store) -> AsyncIterator[str]:
    app = create_app(
        FakeRunner(), ApiConfig(model_name="fake", models_dir=str(store.root), manage_models=True)
    )
    async with serve_app(app) as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture
async def client(store: Store) -> AsyncIterator[Any]:
    app = create_app(
        FakeRunner(), ApiConfig(model_name="fake", models_dir=str(store.root), manage_models=True)
    )
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


# ---- the official client ----


async def test_ollama_client_creates_copies_and_deletes(url: str, store: Store) -> None:
    client = ollama.Client(host=url)
    created = await in_thread(
        lambda: client.create(
            model="me/derived:v1",
            from_="base",
            system="Be terse.",
            template=JINJA,
            parameters={"temperature": 0.1, "stop": ["<end>"], "num_predict": 7},
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            license=["MIT text", "extra terms"],
        )
    )
    assert created.status == "success"
    licenses = [
        store.blob_path(layer.digest).read_text()
        for layer in store.read_manifest("me/derived:v1")[1].layers
        if layer.media_type == "application/vnd.ollama.image.license"
    ]
    assert licenses == ["MIT text", "extra terms"]
    profile = store.resolve("me/derived:v1").profile
    assert profile.system == "Be terse."
    assert profile.template == JINJA
    assert profile.parameters == {"temperature": 0.1, "stop": ["<end>"], "num_predict": 7}
    assert [m["role"] for m in profile.messages] == ["user", "assistant"]

    streamed = await in_thread(
        lambda: list(client.create(model="second", from_="me/derived:v1", stream=True))
    )
    statuses = [p.status for p in streamed]
    assert statuses[0].startswith("using existing layer sha256:")
    assert statuses[-2:] == ["writing manifest", "success"]

    copied = await in_thread(lambda: client.copy("me/derived:v1", "third"))
    assert copied.status == "success"
    assert store.resolve("third").digest == store.resolve("me/derived:v1").digest

    deleted = await in_thread(lambda: client.delete("me/derived:v1"))
    assert deleted.status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(lambda: client.delete("me/derived:v1"))
    assert info.value.status_code == 404
    assert store.resolve("third").profile.system == "Be terse."  # its blobs were kept
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(lambda: client.copy("nothere", "x"))
    assert info.value.status_code == 404


async def test_create_from_a_folder_imports_it_in_a_child_process(
    url: str, store: Store, tiny_folder: Path
) -> None:
    client = ollama.Client(host=url)
    parts = await in_thread(
        lambda: list(
            client.create(
                model="fromfolder", from_=str(tiny_folder), system="s", quantize="q8", stream=True
            )
        )
    )
    assert parts[-1].status == "success"
    assert any(p.status == "writing tensors" and p.total for p in parts)
    files = store.resolve("fromfolder")
    assert files.profile.system == "s"
    assert (
        "int8"
        in store.list_models()[
            [m.name for m in store.list_models()].index("fromfolder:latest")
        ].quantization
    )
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(lambda: client.create(model="x", from_=str(tiny_folder / "missing")))
    assert info.value.status_code == 404


# ---- errors ----


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "x"}, 400, "'from' is required"),
        ({"from": "base"}, 400, "'model' is required"),
        ({"model": "../x", "from": "base"}, 400, "invalid model name"),
        ({"model": "x", "from": "nothere"}, 404, "not found"),
        ({"model": "x", "from": "base", "template": "{{ .Prompt }}"}, 400, "Go template"),
        ({"model": "x", "from": "base", "template": "{% if %}"}, 400, "invalid chat template"),
        ({"model": "x", "from": "base", "parameters": {"temperature": "hot"}}, 400, "number"),
        ({"model": "x", "from": "base", "messages": [{"role": "bot"}]}, 400, "role"),
        ({"model": "x", "from": "base", "files": {"a.gguf": "sha256:00"}}, 400, "files"),
        ({"model": "x", "from": "base", "quantize": "q3_K"}, 400, "quantize"),
        ({"model": "x", "from": "base", "license": [1]}, 400, "license"),
    ],
)
async def test_create_refuses_what_it_cannot_do(client, store: Store, body, status, words) -> None:
    response = await client.post("/api/create", json=body)
    assert response.status_code == status
    assert words in (await response.get_json())["error"]
    assert [m.name for m in store.list_models()] == ["base:latest"]  # nothing was written


async def test_create_without_stream_answers_one_object(client, store: Store) -> None:
    response = await client.post(
        "/api/create", json={"model": "d", "from": "base", "system": "x", "stream": False}
    )
    assert response.status_code == 200
    assert await response.get_json() == {"status": "success"}
    assert store.resolve("d").profile.system == "x"


async def test_copy_and_delete_check_their_names(client, store: Store) -> None:
    response = await client.post("/api/copy", json={"source": "base", "destination": "a/b/c/d"})
    assert response.status_code == 400
    response = await client.post("/api/copy", json={"source": "base"})
    assert response.status_code == 400
    response = await client.delete("/api/delete", json={})
    assert response.status_code == 400
    response = await client.delete("/api/delete", json={"name": "base"})  # the older field
    assert response.status_code == 200
    assert store.list_models() == []


async def test_without_a_store_the_routes_say_so() -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="fake"))
    async with app.test_app() as test_app:
        response = await test_app.test_client().delete("/api/delete", json={"model": "base"})
    assert response.status_code == 400
    assert "model management is off" in (await response.get_json())["error"]


# ---- the served model's profile ----


@attrs.define
class ProfiledRunner(FakeRunner):
    profile: ModelProfile = attrs.field(factory=ModelProfile)

    def model_info(self) -> ModelInfo:
        super().model_info()
        return attrs.evolve(INFO, profile=self.profile)


PROFILE = ModelProfile(
    system="Be terse.",
    parameters={"temperature": 0.25, "top_k": 3, "stop": ["<end>"], "num_predict": 9},
    messages=({"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}),
)


@pytest.fixture
async def profiled() -> AsyncIterator[tuple[ProfiledRunner, Any]]:
    fake = ProfiledRunner(profile=PROFILE)
    app = create_app(fake, ApiConfig(model_name="fake"))
    async with app.test_app() as test_app:
        yield fake, test_app.test_client()


async def test_chat_gets_the_models_system_messages_and_parameters(profiled) -> None:
    fake, client = profiled
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert (await client.post("/api/chat", json=body)).status_code == 200
    req = fake.requests[-1]
    assert req.system == "Be terse."
    assert [(m.role, m.content) for m in req.messages] == [
        ("user", "earlier"),
        ("assistant", "ok"),
        ("user", "hi"),
    ]
    assert req.options.sampling.temperature == 0.25
    assert req.options.sampling.top_k == 3
    assert req.options.stop == ("<end>",)
    assert req.options.num_predict == 9

    body["options"] = {"temperature": 0.9, "stop": ["x"]}  # the request's own values win
    assert (await client.post("/api/chat", json=body)).status_code == 200
    req = fake.requests[-1]
    assert req.options.sampling.temperature == 0.9
    assert req.options.sampling.top_k == 3
    assert req.options.stop == ("x",)


async def test_generate_gets_the_models_profile_unless_raw(profiled) -> None:
    fake, client = profiled
    body = {"model": "fake", "prompt": "hi", "stream": False}
    assert (await client.post("/api/generate", json=body)).status_code == 200
    req = fake.requests[-1]
    assert req.system == "Be terse."
    assert [m.content for m in req.messages or ()] == ["earlier", "ok", "hi"]
    assert req.options.num_predict == 9
    body |= {"system": "mine", "raw": True}
    assert (await client.post("/api/generate", json=body)).status_code == 200
    req = fake.requests[-1]
    assert req.system is None
    assert req.prompt == "hi"
    assert req.messages is None
    assert req.options.sampling.top_k == 3  # parameters apply to a raw prompt too
    body["raw"] = False
    assert (await client.post("/api/generate", json=body)).status_code == 200
    assert fake.requests[-1].system == "mine"


async def test_openai_chat_gets_the_profile_but_keeps_its_own_defaults(profiled) -> None:
    fake, client = profiled
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    req = fake.requests[-1]
    assert req.system == "Be terse."
    assert len(req.messages or ()) == 3
    assert req.options.sampling.temperature == 1.0  # OpenAI's default, as Ollama keeps it
    assert req.options.sampling.top_k == 3
    assert req.options.stop == ("<end>",)


# ---- end to end: the real tree over stored models ----


@asynccontextmanager
async def serving(store: Store, name: str) -> AsyncIterator[str]:
    async with open_runner(
        model=name, models_dir=str(store.root), prefill_chunk=16, cache_gb=0.25
    ) as runner:
        with trio.fail_after(120):  # load guard
            await runner.wait_ready()
        app = create_app(
            runner, ApiConfig(model_name=name, models_dir=str(store.root), manage_models=True)
        )
        async with serve_app(app) as (host, port):
            yield f"http://{host}:{port}"


async def test_a_created_model_is_served_with_its_profile(store: Store) -> None:
    system = "Answer in one word."
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    async with serving(store, "base") as url:
        client = ollama.Client(host=url)
        await in_thread(
            lambda: client.create(
                model="terse",
                from_="base",
                system=system,
                template=JINJA,
                parameters={"num_predict": 1, "temperature": 0},
                messages=history,
            )
        )
        # Deleting the served model's store entry: it goes on serving from memory.
        await in_thread(lambda: client.delete("base"))
        after = await in_thread(lambda: client.generate(model="base", prompt="x", raw=True))
        assert after.done
        # Still listed, first (from memory); the store's other model after it.
        assert [m.model for m in (await in_thread(client.list)).models] == ["base", "terse:latest"]

    async with serving(store, "terse") as url:
        client = ollama.Client(host=url)
        shown = await in_thread(lambda: client.show("terse"))
        assert shown.template == JINJA
        result = await in_thread(lambda: client.generate(model="terse", prompt="why?"))
        assert result.eval_count is not None
        assert result.eval_count <= 1  # the model's num_predict
        tokenizer = Tokenizer.from_model_files(store.resolve("terse"))
        expected = [{"role": "system", "content": system}, *history]
        text = tokenizer.apply_chat_template([*expected, {"role": "user", "content": "why?"}])
        assert result.prompt_eval_count == len(tokenizer.encode(text))


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_stops_its_import(
    store: Store, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setattr(import_process, "JOB_MODULE", "tests.hanging_import_job")
    app = create_app(
        FakeRunner(), ApiConfig(model_name="fake", models_dir=str(store.root), manage_models=True)
    )
    async with serve_app(app) as (host, port):
        body = {"model": "x", "from": "/models/big.gguf", "stream": stream}
        connection = await raw_request(host, port, "POST", "/api/create", body)
        if stream:
            await read_until(connection, b"reading /models/big.gguf")
        await wait_until(lambda: (store.root / "started").exists(), "the child's start")
        await connection.aclose()
        await wait_until(lambda: (store.root / "interrupted").exists(), "the child's SIGINT")


async def test_show_lists_the_models_parameters_and_system(profiled) -> None:
    _, client = profiled
    shown = await (await client.post("/api/show", json={"model": "fake"})).get_json()
    assert shown["system"] == "Be terse."
    lines = shown["parameters"].splitlines()
    assert [line.split()[0] for line in lines] == ["temperature", "top_k", "stop", "num_predict"]
    assert lines[2].split()[1] == '"<end>"'


async def test_a_stopping_server_starts_no_create(store: Store) -> None:
    app = create_app(
        FakeRunner(), ApiConfig(model_name="fake", models_dir=str(store.root), manage_models=True)
    )
    app.extensions["mlxrunner"].draining = True
    async with app.test_app() as test_app:
        body = {"model": "x", "from": "base"}
        response = await test_app.test_client().post("/api/create", json=body)
    assert response.status_code == 503
    assert [m.name for m in store.list_models()] == ["base:latest"]


async def test_create_from_a_gguf_file_with_a_system_prompt(url: str, store: Store) -> None:
    meta = gw.gpt2_tokenizer_metadata()
    config = tiny_config("llama", vocab_size=len(meta["tokenizer.ggml.tokens"]))
    weights = {k: np.array(v) for k, v in random_weights(config).items()}
    path = store.root.parent / "tiny.gguf"
    gw.write_model_gguf(path, config, weights, meta)
    client = ollama.Client(host=url)
    done = await in_thread(
        lambda: client.create(model="fromgguf", from_=str(path), system="From a GGUF.")
    )
    assert done.status == "success"
    files = store.resolve("fromgguf")
    assert files.profile.system == "From a GGUF."
    assert files.tokenizer_json  # rebuilt from the GGUF's metadata


async def test_tags_lists_the_served_model_then_the_stores_others(url: str) -> None:
    client = ollama.Client(host=url)
    await in_thread(lambda: client.copy("base", "other:v2"))
    listed = await in_thread(client.list)
    names = [m.model for m in listed.models]
    assert names[0] == "fake"  # the served one first, with its full details
    assert set(names[1:]) == {"base:latest", "other:v2"}
    stored = listed.models[1]
    assert stored.size
    assert stored.digest
    assert stored.details is not None
    # A stored model is listed, but this server serves one: asking for another is a clear 404.
    with pytest.raises(ollama.ResponseError, match="this server serves 'fake'") as caught:
        await in_thread(lambda: client.generate(model="other:v2", prompt="hi"))
    assert caught.value.status_code == 404


async def test_tags_lists_only_the_served_model_without_a_store() -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="fake"))
    async with app.test_app() as test_app:
        reply = await (await test_app.test_client().get("/api/tags")).get_json()
    assert [m["name"] for m in reply["models"]] == ["fake"]
