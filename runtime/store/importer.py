"""Import a model folder (HF/MLX), a GGUF file or a stored model into the store, optionally
quantizing it.

The source is resolved and checked the way a load does it (``runtime.models.source``). The
result is what Ollama writes for an MLX model: one safetensors blob per module
(``application/vnd.ollama.image.tensor``) with quantized weights as ``<path>.weight`` (packed
``uint32``), ``<path>.weight.scale`` and ``<path>.weight.bias`` and ``quant_type``/``group_size``
in the blob's ``__metadata__``; ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``
(with the chat template, wherever the source kept it) and ``generation_config.json`` as JSON
layers; a config blob saying ``model_format: safetensors``, with the parameter size and the
quantization as ``file_type`` (what ``list`` shows). Scales and biases are float32 (float16
ones are ~50x slower on CPU). Blobs are content-addressed, so re-importing the same weights
reuses them; the manifest is written last (``Store.commit_manifest``), so an interrupted import
leaves no manifest or the previous one, and an import that fails (a full disk, Ctrl-C) removes
its temp files and the blobs it added that no manifest uses.

``quantize``: ``None`` keeps the source's encoding; ``"q4"``/``"q8"`` re-quantizes every Linear
and the embedding whose input size is a multiple of the group size (``mx.quantize``, affine,
``group_size`` 32 or 64, default 64 as Ollama and mlx-lm); ``"f32"`` dequantizes everything to
float32 (the reference for perplexity).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import attrs
import mlx.core as mx

from runtime.errors import ModelLoadError
from runtime.formats.safetensors import check_safetensors
from runtime.models.checkpoint import (
    Checkpoint,
    count_parameters,
    instantiate,
    quantization_label,
)
from runtime.models.source import open_checkpoint
from runtime.progress import Progress, ProgressCallback
from runtime.store.layout import Store
from runtime.store.manifest import (
    CONFIG_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    TENSOR_MEDIA_TYPE,
    Layer,
    Manifest,
)
from runtime.store.names import ModelName
from runtime.store.profile import carried_layers, layer_bytes
from runtime.store.reading import sha256_file

Quantize = Literal["q4", "q8", "f32"]
_BITS = {"q4": 4, "q8": 8}
GROUP_SIZES = (32, 64)
DEFAULT_GROUP_SIZE = 64


@attrs.frozen(kw_only=True)
class ImportResult:
    name: str
    digest: str  # of the manifest
    size_bytes: int
    quantization: str  # as ``show`` and a load report it: "int4 g64", "F32", ...
    parameters: int
    blobs_written: int
    blobs_reused: int


def _quantizable(config: dict[str, Any], weights: dict[str, mx.array], group: int) -> set[str]:
    """Modules ``nn.quantize`` would quantize (Linear, Embedding) whose input size fits ``group``."""
    out = set()
    for path, mod in instantiate(config, "model").named_modules():
        key = f"{path}.weight"
        w = weights.get(key)
        if (
            hasattr(mod, "to_quantized")
            and w is not None
            and w.ndim == 2
            and w.shape[-1] % group == 0
        ):
            out.add(path)
    return out


def _dequantized(src: Checkpoint) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for name, array in src.weights.items():
        module, _, part = name.rpartition(".")
        if module in src.quant:
            if part == "weight":
                bits, group = src.quant[module]
                array = mx.dequantize(
                    array,
                    src.weights[f"{module}.scales"].astype(mx.float32),
                    src.weights[f"{module}.biases"].astype(mx.float32),
                    group_size=group,
                    bits=bits,
                )
            elif part in ("scales", "biases"):
                continue
        out[name] = array
    return out


def transform(
    src: Checkpoint, quantize: Quantize | None, group_size: int
) -> tuple[dict[str, mx.array], dict[str, tuple[int, int]]]:
    """The tensors to store (mlx-lm names) and (bits, group) of each quantized module."""
    if quantize is None:
        weights = {
            k: v.astype(mx.float32) if k.endswith((".scales", ".biases")) else v
            for k, v in src.weights.items()
        }
        return weights, dict(src.quant)
    weights = _dequantized(src)
    if quantize == "f32":
        return {k: v.astype(mx.float32) for k, v in weights.items()}, {}
    bits = _BITS[quantize]
    quant: dict[str, tuple[int, int]] = {}
    for module in sorted(_quantizable(src.config, weights, group_size)):
        w, scales, biases = mx.quantize(
            weights.pop(f"{module}.weight").astype(mx.float32), group_size=group_size, bits=bits
        )
        weights |= {f"{module}.weight": w, f"{module}.scales": scales, f"{module}.biases": biases}
        quant[module] = (bits, group_size)
    return weights, quant


def human_parameters(n: int) -> str:
    """Ollama's style: ``134.52M``, ``1.24B``, ``116.74K``."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _ollama_tensors(module: str, weights: dict[str, mx.array], quantized: bool) -> dict[str, Any]:
    out = {}
    for name, array in weights.items():
        if quantized and name == f"{module}.scales":
            name = f"{module}.weight.scale"
        elif quantized and name == f"{module}.biases":
            name = f"{module}.weight.bias"
        out[name] = array
    return out


def _write_tensors(f: BinaryIO, arrays: dict[str, Any], metadata: dict[str, str]) -> None:
    # To a file object, not a path: then a failed write (a full disk) raises OSError here,
    # where MLX writing to a path leaves a short file and reports nothing.
    try:
        mx.save_safetensors(f, arrays, metadata=metadata)
    except RuntimeError as exc:
        raise ModelLoadError(f"cannot write a tensor blob ({exc})") from exc


def _check_written(path: Path) -> None:
    """The header read back against the file's size: a write lost without an error still
    shows as a short file here, before the blob gets a (valid) digest of its short bytes."""
    try:
        check_safetensors(path)
    except ModelLoadError as exc:
        raise ModelLoadError(f"writing a blob failed (is the disk full?): {exc}") from exc


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")


class _BlobWriter:
    """Adds blobs to the store and counts how many were new and how many already there."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.written = 0
        self.reused = 0
        self.new_digests: set[str] = set()  # blobs this import added: dropped if it fails

    def _count(self, blob: Layer, reused: bool) -> Layer:
        self.written += not reused
        self.reused += reused
        if not reused:
            self.new_digests.add(blob.digest)
        return blob

    def tensors(
        self, module: str, tensors: dict[str, mx.array], quant: tuple[int, int] | None
    ) -> Layer:
        metadata = {}
        if quant is not None:
            metadata = {"quant_type": f"int{quant[0]}", "group_size": str(quant[1])}
        arrays = _ollama_tensors(module, tensors, quant is not None)
        written = self.store.write_blob(
            lambda f: _write_tensors(f, arrays, metadata), check=_check_written
        )
        blob = self._count(*written)
        return attrs.evolve(blob, media_type=TENSOR_MEDIA_TYPE, name=module)

    def json(self, media_type: str, data: bytes, name: str = "") -> Layer:
        blob = self._count(*self.store.add_bytes(data))
        return attrs.evolve(blob, media_type=media_type, name=name)


@contextlib.contextmanager
def _undone_on_failure(store: Store, writer: _BlobWriter) -> Iterator[None]:
    """An import that fails before its manifest is committed (a full disk, Ctrl-C) drops the
    blobs it added that no manifest uses: the store is as before, and the space is free."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            store.prune(writer.new_digests)
        raise


def import_model(
    source: str | Path,
    name: str,
    *,
    store: Store,
    quantize: Quantize | None = None,
    group_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Import ``source`` (folder, ``.gguf`` file, or a name in ``store``) as ``name``."""
    parsed = ModelName.parse(name)
    if quantize not in (None, "q4", "q8", "f32"):
        raise ModelLoadError(f"unknown quantization {quantize!r}; use q4, q8 or f32")
    if group_size is not None and quantize not in ("q4", "q8"):
        raise ModelLoadError("a group size needs --quantize q4 or q8")
    group = group_size or DEFAULT_GROUP_SIZE
    if group not in GROUP_SIZES:
        raise ModelLoadError(f"group size must be 32 or 64, not {group}")
    report = progress or (lambda _: None)
    report(Progress(phase="read"))
    src = open_checkpoint(source, store=store, progress=report)
    weights, quant = transform(src, quantize, group)

    modules: dict[str, dict[str, mx.array]] = {}
    for key in sorted(weights):
        modules.setdefault(key.rpartition(".")[0], {})[key] = weights[key]
    total = Progress(
        phase="write", total_bytes=sum(v.nbytes for v in weights.values()), total_items=len(weights)
    )
    store.remove_stale_temps()
    report(total)
    writer = _BlobWriter(store)
    with _undone_on_failure(store, writer):
        layers: list[Layer] = []
        done = total
        for module, tensors in modules.items():
            layers.append(writer.tensors(module, tensors, quant.get(module)))
            done = attrs.evolve(
                done,
                done_items=done.done_items + len(tensors),
                done_bytes=done.done_bytes + sum(v.nbytes for v in tensors.values()),
            )
            report(done)

        json_files = {
            "config.json": _json_bytes(src.config),
            "tokenizer.json": src.files.tokenizer_json.encode("utf-8"),
            "tokenizer_config.json": _json_bytes(src.files.tokenizer_config),
        }
        if src.files.generation_config is not None:
            json_files["generation_config.json"] = _json_bytes(src.files.generation_config)
        layers += [writer.json(JSON_MEDIA_TYPE, data, file) for file, data in json_files.items()]
        # A stored source's own system prompt, parameters and messages stay with the model.
        layers += [
            writer.json(media_type, layer_bytes(media_type, value))
            for media_type, value in carried_layers(src.files.profile)
        ]

        n_params = count_parameters(weights, quant)
        model_type = str(src.config.get("model_type", ""))
        kind = quantization_label(weights, quant)
        config_blob = {
            "model_format": "safetensors",
            "model_family": model_type,
            "model_families": [model_type],
            "model_type": human_parameters(n_params),
            "file_type": kind,
            "capabilities": ["completion"],
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        }
        config = writer.json(CONFIG_MEDIA_TYPE, _json_bytes(config_blob))
        manifest = Manifest(config=config, layers=tuple(layers))
        try:
            previous = store.read_manifest(parsed)[1].digests()
        except ModelLoadError:
            previous = set()
        path = store.commit_manifest(parsed, manifest)
    store.prune(previous - manifest.digests())  # blobs only the replaced manifest used
    report(attrs.evolve(done, phase="done"))
    return ImportResult(
        name=parsed.short,
        digest=sha256_file(path),
        size_bytes=manifest.config.size + sum(layer.size for layer in layers),
        quantization=kind,
        parameters=n_params,
        blobs_written=writer.written,
        blobs_reused=writer.reused,
    )
