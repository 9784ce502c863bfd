"""Resolve a model source and build a ready model: folder, GGUF file or store name.

``load_model`` is the one entry point. It reads tensors (``weights.read_tensors`` or
``gguf.read_gguf``), checks every expected tensor is present with the right shape (a
``ModelLoadError`` names the tensor and its file), applies quantization where the checkpoint
has scales, and picks how to execute it:

- ``dense``: dequantize quantized weights to float32 (fastest on CPU with OpenBLAS: quantized
  matmul on CPU does not use BLAS);
- ``quantized``: keep packed weights, with float32 scales/biases on CPU (float16 scales are
  ~50x slower there);
- ``auto`` (default): dense on CPU with an optimized BLAS, quantized otherwise (GPU, or CPU
  stuck with the reference BLAS).

Must run on the engine thread: it creates MLX arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from runtime.blas import loaded_blas
from runtime.errors import ModelLoadError, ModelNotFoundError
from runtime.formats.safetensors import ModelFiles, TensorSet, folder_files, read_tensors
from runtime.models import architecture

if TYPE_CHECKING:
    from runtime.store.layout import Store
    from runtime.text.tokenizer import Tokenizer

Execution = Literal["auto", "dense", "quantized"]


@attrs.frozen(kw_only=True)
class LoadProgress:
    """Where a load is. ``fraction`` is what /health reports."""

    phase: str  # "read", "build", "ready"
    done_bytes: int
    total_bytes: int
    done_items: int = 0  # tensors read
    total_items: int = 0

    @property
    def fraction(self) -> float:
        if self.phase == "ready":
            return 1.0
        if self.total_bytes <= 0:
            return 0.0
        # Reading dominates; building gets the last tenth.
        read = 0.9 * min(1.0, self.done_bytes / self.total_bytes)
        return read if self.phase == "read" else 0.9


ProgressCallback = Callable[[LoadProgress], None]


@attrs.frozen(kw_only=True)
class LoadedModel:
    model: Any  # an architecture's ``Model`` (nn.Module with hidden/unembed/make_cache)
    tokenizer: Tokenizer
    config: dict[str, Any]
    name: str
    model_type: str
    context_length: int
    parameters: int
    quantization: str  # as stored: "F32", "BF16", "int4 g32", ...
    execution: Literal["dense", "quantized"]
    size_bytes: int
    digest: str
    modified_at: float
    load_seconds: float


def default_execution() -> Literal["dense", "quantized"]:
    if mx.default_device() == mx.cpu:
        return "dense" if loaded_blas() else "quantized"
    return "quantized"


def load_model(
    source: str | Path,
    *,
    store: Store | None = None,
    execution: Execution = "auto",
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    """Load ``source``: a model folder, a ``.gguf`` file, or a store name (``name[:tag]``)."""
    from runtime.text.tokenizer import Tokenizer

    started = time.perf_counter()
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from runtime.formats.gguf import read_gguf

        if progress:
            progress(LoadProgress(phase="read", done_bytes=0, total_bytes=path.stat().st_size))
        contents = read_gguf(path)
        tensors = TensorSet(
            tensors=dict(contents.weights),
            origins=dict.fromkeys(contents.weights, str(path)),
            quant={},
        )
        tokenizer = Tokenizer.from_parts(
            contents.tokenizer_json, contents.tokenizer_config, config=contents.config
        )
        stat = path.stat()
        files = ModelFiles(
            name=str(path),
            config=contents.config,
            tokenizer_json=contents.tokenizer_json,
            tokenizer_config=contents.tokenizer_config,
            generation_config=None,
            weight_files=(path,),
            size_bytes=stat.st_size,
            modified_at=stat.st_mtime,
        )
    else:
        if path.is_dir():
            files = folder_files(path)
        elif _looks_like_path(str(source)):
            raise ModelNotFoundError(f"{source}: no such model folder or .gguf file")
        else:
            from runtime.store.layout import Store

            files = (store or Store.default()).resolve(str(source))
        done = done_tensors = 0

        def on_file(_: Path, size: int, count: int, total_tensors: int) -> None:
            nonlocal done, done_tensors
            done += size
            done_tensors += count
            if progress:
                progress(
                    LoadProgress(
                        phase="read",
                        done_bytes=done,
                        total_bytes=files.size_bytes,
                        done_items=done_tensors,
                        total_items=total_tensors,
                    )
                )

        tensors = read_tensors(files.weight_files, on_file=on_file)
        tokenizer = Tokenizer.from_model_files(files)
    n_tensors = len(tensors.tensors)

    def finished(phase: str) -> None:
        if progress:
            size = files.size_bytes
            progress(
                LoadProgress(
                    phase=phase,
                    done_bytes=size,
                    total_bytes=size,
                    done_items=n_tensors,
                    total_items=n_tensors,
                )
            )

    finished("build")
    chosen = default_execution() if execution == "auto" else execution
    model, stored_quant = build_model(files.config, tensors, execution=chosen, name=files.name)
    finished("ready")
    n_params = _count_parameters(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=files.config,
        name=files.name,
        model_type=str(files.config.get("model_type")),
        context_length=int(model.args.max_position_embeddings),
        parameters=n_params,
        quantization=stored_quant,
        execution=chosen,
        size_bytes=files.size_bytes,
        digest=files.digest,
        modified_at=files.modified_at,
        load_seconds=time.perf_counter() - started,
    )


def flat_parameters(model: nn.Module) -> dict[str, mx.array]:
    """``{dotted name: array}`` of a module's parameters (checkpoint names)."""
    return dict(cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))


def _looks_like_path(source: str) -> bool:
    """A store name never starts with ``/``, ``.`` or ``~`` nor ends in ``.gguf``."""
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or "\\" in source


def _count_parameters(model: nn.Module) -> int:
    total = 0
    for name, array in flat_parameters(model).items():
        if name.endswith((".scales", ".biases")):
            continue
        if array.dtype == mx.uint32:  # packed: bits per element from the scales' group layout
            module_bits = getattr(_module_at(model, name.rsplit(".", 1)[0]), "bits", 32)
            total += array.size * 32 // module_bits
        else:
            total += array.size
    return total


def _module_at(model: nn.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _infer_quant(weight: mx.array, scales: mx.array, in_dims: int) -> tuple[int, int]:
    bits = weight.shape[-1] * 32 // in_dims
    group = in_dims // scales.shape[-1]
    return bits, group


def build_model(
    config: dict[str, Any],
    tensors: TensorSet,
    *,
    execution: Literal["dense", "quantized"],
    name: str = "model",
) -> tuple[nn.Module, str]:
    """Instantiate the architecture and load ``tensors`` into it; return (model, stored quant)."""
    module = architecture(config)
    try:
        args = module.ModelArgs.from_dict(config)
        model = module.Model(args)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{name}: invalid config.json ({exc})") from exc
    weights = model.sanitize(dict(tensors.tensors))
    origins = tensors.origins
    expected = flat_parameters(model)

    def where(key: str) -> str:
        return origins.get(key, name)

    quantized = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    params: dict[str, tuple[int, int]] = {}
    for path in quantized:
        w_key = path + ".weight"
        if w_key not in weights:
            raise ModelLoadError(
                f"{where(path + '.scales')}: tensor {w_key!r} missing beside its scales"
            )
        if w_key not in expected:
            raise ModelLoadError(f"{where(w_key)}: unexpected tensor {w_key!r}")
        in_dims = expected[w_key].shape[-1]
        inferred = _infer_quant(weights[w_key], weights[path + ".scales"], in_dims)
        params[path] = tensors.quant.get(path, inferred)
        if params[path] != inferred or inferred[0] not in (2, 3, 4, 5, 6, 8):
            raise ModelLoadError(
                f"{where(w_key)}: tensor {w_key!r} shape {tuple(weights[w_key].shape)} does not "
                f"match its quantization {params[path]} for input size {in_dims}"
            )
    stored = _describe_quant(params, weights)

    if execution == "dense" or not params:
        for path, (bits, group) in params.items():
            # In float32: f16/bf16 scales would round the dequantized weights.
            biases = weights.pop(path + ".biases", None)
            w = mx.dequantize(
                weights.pop(path + ".weight"),
                weights.pop(path + ".scales").astype(mx.float32),
                biases.astype(mx.float32) if biases is not None else None,
                group_size=group,
                bits=bits,
            )
            weights[path + ".weight"] = w.astype(mx.float32)
    else:
        nn.quantize(
            model,
            class_predicate=lambda p, m: (
                {"group_size": params[p][1], "bits": params[p][0]} if p in params else False
            ),
        )
        expected = flat_parameters(model)

    float_dtype = mx.float32 if mx.default_device() == mx.cpu else None
    for key, array in list(weights.items()):
        if float_dtype is not None and mx.issubdtype(array.dtype, mx.floating):
            weights[key] = array.astype(float_dtype)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelLoadError(f"{name}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ModelLoadError(f"{where(extra[0])}: unexpected tensor {extra[0]!r}")
    for key, array in weights.items():
        if tuple(array.shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"{where(key)}: tensor {key!r} has shape {tuple(array.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    model.load_weights(list(weights.items()), strict=True)
    try:
        mx.eval(model.parameters())
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot read tensor data ({exc})") from exc
    model.eval()
    return model, stored


def _describe_quant(params: dict[str, tuple[int, int]], weights: dict[str, mx.array]) -> str:
    if not params:
        names = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
        dtypes = {names.get(str(a.dtype).split(".")[-1], "?") for a in weights.values()}
        return "/".join(sorted(dtypes)) or "F32"
    common: dict[tuple[int, int], int] = {}
    for p in params.values():
        common[p] = common.get(p, 0) + 1
    bits, group = max(common, key=lambda k: common[k])
    return f"int{bits} g{group}"
