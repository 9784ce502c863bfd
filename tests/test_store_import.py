"""Import and load through the store: Ollama-written fixtures, round trips, quantization,
interrupted imports and a concurrent ``rm``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

import runtime.store.layout
from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.formats.safetensors import check_safetensors
from runtime.models.description import describe
from runtime.models.loader import load_model
from runtime.store.importer import import_model
from runtime.store.layout import Store
from runtime.testing.models import make_tiny_folder, quantize_weights, random_weights, tiny_config
from runtime.testing.tokenizers import CHAT_TEMPLATE, tokenizer_config, train_tokenizer
from tests import gguf_writer as gw

IDS = [[5, 17, 42, 9, 100, 3, 77]]


def _logits(loaded: Any) -> np.ndarray:
    return np.array(loaded.model(mx.array(IDS, dtype=mx.int32)))


def _greedy(loaded: Any, steps: int = 12) -> list[int]:
    model, cache, out = loaded.model, loaded.model.make_cache(), []
    logits = model(mx.array(IDS, dtype=mx.int32), cache)
    for _ in range(steps):
        token = int(np.array(mx.argmax(logits[0, -1])))
        out.append(token)
        logits = model(mx.array([[token]], dtype=mx.int32), cache)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("src") / "tiny", "qwen2")


# ---- a store written exactly as Ollama writes an MLX model ----


def _blob(root: Path, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _ollama_store(root: Path, folder: Path, bits: int, group: int, name: str) -> None:
    """One blob per tensor; quantized ones hold weight + ``.scale`` + ``.bias``, as Ollama does."""
    config = json.loads((folder / "config.json").read_text())
    weights = quantize_weights(config, random_weights(config), bits=bits, group_size=group)
    layers = []
    tmp = root / "tmp.safetensors"
    root.mkdir(parents=True, exist_ok=True)
    for key in sorted(weights):
        module, _, part = key.rpartition(".")
        if part in ("scales", "biases"):
            continue
        arrays = {key: weights[key]}
        metadata = {}
        if f"{module}.scales" in weights and part == "weight":
            arrays[f"{key}.scale"] = weights[f"{module}.scales"]
            arrays[f"{key}.bias"] = weights[f"{module}.biases"]
            metadata = {"quant_type": f"int{bits}", "group_size": str(group)}
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        blob = _blob(root, tmp.read_bytes())
        layers.append({"mediaType": "application/vnd.ollama.image.tensor", **blob, "name": key})
    tmp.unlink()
    for file_name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        blob = _blob(root, (folder / file_name).read_bytes())
        layers.append({"mediaType": "application/vnd.ollama.image.json", **blob, "name": file_name})
    # Layers the runner ignores (Ollama writes them for every model).
    layers.append(
        {"mediaType": "application/vnd.ollama.image.template", **_blob(root, b"{{ .Prompt }}")}
    )
    layers.append(
        {"mediaType": "application/vnd.ollama.image.params", **_blob(root, b'{"temperature":0.6}')}
    )
    cfg = {"model_format": "safetensors", "model_family": "qwen2", "file_type": f"int{bits}"}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            **_blob(root, json.dumps(cfg).encode()),
        },
        "layers": layers,
    }
    path = root / "manifests" / "registry.ollama.ai" / "library" / name.replace(":", "/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 64)])
def test_ollama_written_store_generates_like_its_folder(
    tmp_path: Path, folder: Path, bits: int, group: int
) -> None:
    qfolder = make_tiny_folder(tmp_path / "q", "qwen2", quantize=(bits, group))
    _ollama_store(tmp_path / "ollama", folder, bits, group, "tiny:mlx")
    store = Store(tmp_path / "ollama")
    for execution in ("quantized", "dense"):
        ours = load_model("tiny:mlx", store=store, execution=execution)
        ref = load_model(qfolder, execution=execution)
        assert ours.quantization == f"int{bits} g{group}"
        assert _greedy(ours) == _greedy(ref)
        assert np.array_equal(_logits(ours), _logits(ref))
    assert describe("tiny:mlx", store=store).quantization == f"int{bits} g{group}"


# ---- round trips ----


def test_folder_round_trip_gives_identical_logits(tmp_path: Path, folder: Path) -> None:
    store = Store(tmp_path / "models")
    import_model(folder, "tiny", store=store)
    assert np.array_equal(_logits(load_model("tiny", store=store)), _logits(load_model(folder)))


def test_quantized_folder_round_trip_keeps_its_grid(tmp_path: Path) -> None:
    qfolder = make_tiny_folder(tmp_path / "q", "llama", quantize=(4, 64))
    store = Store(tmp_path / "models")
    result = import_model(qfolder, "tiny:q", store=store)
    assert result.quantization == "int4 g64"
    ours = load_model("tiny:q", store=store, execution="quantized")
    assert ours.quantization == "int4 g64"
    assert np.array_equal(_logits(ours), _logits(load_model(qfolder, execution="quantized")))


def test_gguf_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    meta = gw.gpt2_tokenizer_metadata()
    config = tiny_config("llama", vocab_size=len(meta["tokenizer.ggml.tokens"]))
    weights = {k: np.array(v) for k, v in random_weights(config).items()}
    path = tmp_path / "tiny.gguf"
    gw.write_model_gguf(path, config, weights, meta)
    store = Store(tmp_path / "models")
    result = import_model(path, "gguf:tiny", store=store)
    assert result.quantization == "int4 g32"  # mixed Q4_0/Q4_1/Q8_0/F16: most modules are 4-bit
    for execution in ("dense", "quantized"):
        ours = load_model("gguf:tiny", store=store, execution=execution)
        ref = load_model(path, execution=execution)
        assert np.array_equal(_logits(ours), _logits(ref))
    files = store.resolve("gguf:tiny")
    assert files.tokenizer_config["chat_template"] == gw.CHATML
    for blob in files.weight_files:  # float32 scales, Ollama names and metadata
        header, metadata = check_safetensors(blob)
        for key, info in header.items():
            assert not key.endswith((".scales", ".biases"))
            if key.endswith((".weight.scale", ".weight.bias")):
                assert info["dtype"] == "F32"
                assert metadata["quant_type"] in ("int4", "int8")
                assert metadata["group_size"] == "32"


@pytest.mark.parametrize(("quantize", "group"), [("q4", 32), ("q4", 64), ("q8", 32), ("q8", 64)])
def test_quantize_on_import(tmp_path: Path, folder: Path, quantize: str, group: int) -> None:
    store = Store(tmp_path / "models")
    import_model(folder, "tiny:q", store=store, quantize=quantize, group_size=group)  # type: ignore[arg-type]
    bits = int(quantize[1])
    quantized = load_model("tiny:q", store=store, execution="quantized")
    dense = load_model("tiny:q", store=store, execution="dense")
    assert quantized.quantization == f"int{bits} g{group}"
    assert "QuantizedEmbedding" in type(quantized.model.model.embed_tokens).__name__
    assert np.max(np.abs(_logits(quantized) - _logits(dense))) < 1e-3
    error = np.max(np.abs(_logits(dense) - _logits(load_model(folder))))
    assert 0 < error < (0.05 if bits == 8 else 1.0)
    assert len(_greedy(quantized)) == 12


def test_f32_import_dequantizes(tmp_path: Path) -> None:
    qfolder = make_tiny_folder(tmp_path / "q", "llama", quantize=(4, 32))
    store = Store(tmp_path / "models")
    assert import_model(qfolder, "t:f32", store=store, quantize="f32").quantization == "F32"
    ours = load_model("t:f32", store=store)
    assert ours.quantization == "F32"
    assert np.allclose(_logits(ours), _logits(load_model(qfolder, execution="dense")), atol=1e-5)


def test_reimport_reuses_blobs_and_prunes_replaced_ones(tmp_path: Path, folder: Path) -> None:
    store = Store(tmp_path / "models")
    first = import_model(folder, "tiny", store=store)
    again = import_model(folder, "tiny", store=store)
    assert again.blobs_written == 0
    assert again.blobs_reused == first.blobs_written
    assert again.digest == first.digest
    import_model(folder, "tiny", store=store, quantize="q8")  # replaces the dense weights
    used = {store.blob_path(d).name for d in store.read_manifest("tiny")[1].digests()}
    assert {p.name for p in store.blobs.iterdir()} == used


def test_chat_template_file_is_carried(tmp_path: Path) -> None:
    src = make_tiny_folder(
        tmp_path / "src",
        tokenizer_json=train_tokenizer(),
        tokenizer_config={k: v for k, v in tokenizer_config().items() if k != "chat_template"},
    )
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (src / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    store = Store(tmp_path / "models")
    import_model(src, "t", store=store)
    info = describe("t", store=store)
    assert info.template == CHAT_TEMPLATE
    assert store.resolve("t").generation_config == {"eos_token_id": [0, 2]}
    assert info.context_length == 256
    assert info.parameters == load_model("t", store=store).parameters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "q3"}, "unknown quantization"),
        ({"quantize": "q4", "group_size": 128}, "group size"),
        ({"group_size": 32}, "needs --quantize"),
    ],
)
def test_bad_import_options(tmp_path: Path, folder: Path, kwargs: Any, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        import_model(folder, "t", store=Store(tmp_path), **kwargs)


def test_bad_sources_are_clear_errors(tmp_path: Path, folder: Path) -> None:
    store = Store(tmp_path / "models")
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        import_model(tmp_path / "nope", "t", store=store)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model folder or a GGUF"):
        import_model(tmp_path / "x.txt", "t", store=store)
    broken = shutil.copytree(folder, tmp_path / "broken")
    w = mx.load(str(broken / "model.safetensors"))
    assert isinstance(w, dict)
    del w["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(broken / "model.safetensors"), w)
    with pytest.raises(ModelLoadError, match=r"up_proj\.weight"):
        import_model(broken, "t", store=store)
    assert not store.manifests.exists() or not any(store.manifests.rglob("t"))


# ---- interrupted imports and a concurrent rm ----


class _Interrupt(BaseException):
    """Stands for Ctrl-C or a kill at one write step."""


def test_interrupted_import_never_leaves_a_broken_manifest(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "models")
    import_model(folder, "tiny:new", store=store, quantize="q8")  # replaced below
    before = _logits(load_model("tiny:new", store=store))
    after_ref = _logits(load_model(folder))
    real_fsync = runtime.store.layout._fsync
    snapshots: list[Path] = []

    def snapshot(fd: int) -> None:  # the store as `kill -9` here would leave it
        snapshots.append(Path(shutil.copytree(store.root, tmp_path / f"snap{len(snapshots)}")))
        real_fsync(fd)

    monkeypatch.setattr(runtime.store.layout, "_fsync", snapshot)
    import_model(folder, "tiny:new", store=store)
    monkeypatch.setattr(runtime.store.layout, "_fsync", real_fsync)
    assert len(snapshots) > 20
    for snap in snapshots:
        try:
            loaded = load_model("tiny:new", store=Store(snap))
        except ModelLoadError as exc:  # pragma: no cover - the property under test
            raise AssertionError(f"{snap.name}: {exc}") from exc
        got = _logits(loaded)
        assert np.array_equal(got, before) or np.array_equal(got, after_ref)

    # Raising (Ctrl-C) at each step: the previous manifest or the new one, no temp files.
    for step in range(0, len(snapshots), 3):
        calls = 0

        def interrupt(fd: int, step: int = step) -> None:
            nonlocal calls
            calls += 1
            if calls > step:
                raise _Interrupt
            real_fsync(fd)

        root = Path(shutil.copytree(tmp_path / "snap0", tmp_path / f"ctrlc{step}"))
        left_by_kill = set((root / "blobs").glob(".partial-*"))  # snap0 was taken mid-write
        monkeypatch.setattr(runtime.store.layout, "_fsync", interrupt)
        with pytest.raises(_Interrupt):
            import_model(folder, "fresh", store=Store(root), quantize="q4")
        monkeypatch.setattr(runtime.store.layout, "_fsync", real_fsync)
        with pytest.raises(ModelNotFoundError):
            Store(root).resolve("fresh")
        assert set((root / "blobs").glob(".partial-*")) == left_by_kill
        assert np.array_equal(_logits(load_model("tiny:new", store=Store(root))), before)


def test_rm_during_import_cannot_leave_a_dangling_manifest(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "models")
    import_model(folder, "a", store=store)
    real_add_blob = Store.add_blob
    removed = False

    def add_blob_then_rm(self: Store, temp: Path) -> Any:
        nonlocal removed
        out = real_add_blob(self, temp)
        if out[1] and not removed:  # reused a blob of "a": now another process removes "a"
            removed = True
            self.remove("a")
        return out

    monkeypatch.setattr(Store, "add_blob", add_blob_then_rm)
    with pytest.raises(ModelLoadError, match="vanished during the import"):
        import_model(folder, "b", store=store)
    monkeypatch.undo()
    with pytest.raises(ModelNotFoundError):
        store.resolve("b")
    import_model(folder, "b", store=store)  # a retry works
    load_model("b", store=store)


def test_import_from_a_store_name_requantizes(tmp_path: Path, folder: Path) -> None:
    store = Store(tmp_path / "models")
    import_model(folder, "tiny", store=store)
    result = import_model("tiny", "tiny:q8", store=store, quantize="q8", group_size=32)
    assert result.quantization == "int8 g32"
    assert load_model("tiny:q8", store=store).quantization == "int8 g32"
    with pytest.raises(ModelNotFoundError, match="'nope:latest' not found"):
        import_model("nope", "x", store=store)
