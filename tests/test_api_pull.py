"""``/api/pull`` over a real socket, against a registry on 127.0.0.1: Ollama's client sees
its progress lines and errors, and a client that goes away stops the download (the part
downloaded is kept for the next pull)."""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
import trio

from api.app import ApiConfig, create_app
from runtime.store import registry as registry_module
from runtime.store.layout import Store
from runtime.store.names import ModelName
from tests.api_fakes import FakeRunner, raw_request, serve_app
from tests.registry_server import Gate, Registry, serve_registry, tiny_gguf
from tests.waits import read_until, wait_until


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def registry(gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    with serve_registry() as served:
        served.add_model("tiny", "latest", gguf)
        monkeypatch.setenv(registry_module.ENV_REGISTRY, served.url)
        yield served


@pytest.fixture
async def server(tmp_path: Path, registry: Registry) -> AsyncIterator[str]:
    config = ApiConfig(model_name="fake", models_dir=str(tmp_path / "models"), allow_pull=True)
    async with serve_app(create_app(FakeRunner(), config)) as (host, port):
        yield f"http://{host}:{port}"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def in_thread(fn: Any) -> Any:
    return await trio.to_thread.run_sync(fn)


async def test_ollama_client_pull_streamed(server: str, tmp_path: Path, gguf: bytes) -> None:
    client = ollama.Client(host=server)
    parts = await in_thread(lambda: list(client.pull("tiny", stream=True)))
    assert parts[0].status == "pulling manifest"
    assert parts[-1].status == "success"
    blob = [p for p in parts if p.digest == _digest(gguf)]
    assert blob[-1].total == blob[-1].completed == len(gguf)
    assert Store(tmp_path / "models").gguf_blob("tiny") is not None


async def test_ollama_client_pull_whole(server: str, tmp_path: Path) -> None:
    client = ollama.Client(host=server)
    result = await in_thread(lambda: client.pull("tiny"))
    assert result.status == "success"
    assert Store(tmp_path / "models").gguf_blob("tiny:latest") is not None


async def test_an_unknown_model_is_a_404_before_the_stream(server: str) -> None:
    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(lambda: list(client.pull("nothing", stream=True)))
    assert caught.value.status_code == 404
    assert "no such model or tag" in caught.value.error


async def test_an_unsupported_manifest_is_a_502(server: str, registry: Registry) -> None:
    body = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    registry.set_manifest(
        "list", "latest", body, content_type="application/vnd.oci.image.index.v1+json"
    )
    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as caught:
        await in_thread(lambda: client.pull("list"))
    assert caught.value.status_code == 502
    assert "manifest list" in caught.value.error


async def test_a_digest_mismatch_ends_the_stream_with_an_error_line(
    server: str, registry: Registry, gguf: bytes, tmp_path: Path
) -> None:
    registry.corrupt.add(_digest(gguf))
    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError, match="does not match the manifest"):
        await in_thread(lambda: list(client.pull("tiny", stream=True)))
    with pytest.raises(ollama.ResponseError, match="does not match the manifest") as caught:
        await in_thread(lambda: client.pull("tiny"))
    assert caught.value.status_code == 502
    assert not Store(tmp_path / "models").manifest_path(ModelName.parse("tiny")).exists()


async def test_pulling_is_refused_unless_allowed(registry: Registry) -> None:
    app = create_app(FakeRunner(), ApiConfig(model_name="fake"))
    async with app.test_app() as test_app:
        response = await test_app.test_client().post("/api/pull", json={"model": "tiny"})
    assert response.status_code == 403
    assert (await response.get_json()) == {"error": "pulling models is not allowed on this server"}
    assert registry.requests == []


def _unlocked(path: Path) -> bool:
    with path.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


async def test_a_client_that_goes_away_stops_the_download(
    server: str,
    registry: Registry,
    gguf: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry_module, "CHUNK", 1024)
    digest = _digest(gguf)
    gate = registry.gates[digest] = Gate(after=4096)
    host, port = server.removeprefix("http://").split(":")
    stream = await raw_request(host, int(port), "POST", "/api/pull", {"model": "tiny"})
    await read_until(stream, b'"completed":4096')
    await stream.aclose()
    gate.open.set()  # the step waiting on the registry ends; the next one is not taken
    store = Store(tmp_path / "models")
    partial = registry_module.partial_path(store, digest)
    await wait_until(lambda: _unlocked(partial), "the pull's generator closed")
    assert not store.blob_path(digest).exists()
    kept = partial.stat().st_size
    assert 4096 <= kept < len(gguf)
    client = ollama.Client(host=server)
    assert (await in_thread(lambda: client.pull("tiny"))).status == "success"
    assert registry.blob_requests(digest)[-1] == f"bytes={kept}-"


def test_serve_allows_pulls_into_its_store() -> None:
    from cli.main import build_parser
    from cli.serve import api_config

    config = api_config(build_parser().parse_args(["serve", "--models-dir", "/m"]), {})
    assert config.allow_pull is True
    assert config.models_dir == "/m"


async def test_insecure_reaches_a_registry_of_ones_own(
    server: str, registry: Registry, gguf: bytes, tmp_path: Path
) -> None:
    registry.add_model("tiny", "v1", gguf, namespace="team")
    name = f"{registry.url.removeprefix('http://')}/team/tiny:v1"
    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as caught:  # https to a plain HTTP server
        await in_thread(lambda: client.pull(name))
    assert caught.value.status_code == 502
    assert (await in_thread(lambda: client.pull(name, insecure=True))).status == "success"
    assert Store(tmp_path / "models").gguf_blob(name) is not None
