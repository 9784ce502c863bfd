"""Build a ready model from a source: folder, GGUF file or store name.

``load_model`` is the one entry point. It resolves and checks the source
(``runtime.models.source.open_checkpoint``, the same path ``import`` and ``show`` take), builds
the tokenizer from the source's files (chat template, ``generation_config.json`` EOS ids) and
the architecture from its tensors, applying each module's quantization, and picks how to
execute it:

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
from typing import TYPE_CHECKING, Any, Literal

import attrs
import mlx.core as mx
import mlx.nn as nn

from runtime.blas import loaded_blas
from runtime.errors import ModelLoadError
from runtime.formats.safetensors import TensorSet
from runtime.models.checkpoint import check_weights, instantiate, quantization_label
from runtime.models.quantized_linear import adopt_quantized_linears
from runtime.models.source import open_checkpoint
from runtime.progress import Progress
from runtime.store.profile import ModelProfile

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
    # generation_config.json's sampling values under Ollama's option names: defaults for
    # requests that leave an option out (``ModelFiles.sampling_defaults``).
    sampling_defaults: dict[str, float | int] = attrs.field(factory=dict)
    # A stored model's system prompt, parameters and messages (``runtime.store.profile``).
    profile: ModelProfile = attrs.field(factory=ModelProfile)


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

    def report(p: Progress) -> None:
        if progress is not None:
            progress(
                LoadProgress(
                    phase=p.phase,
                    done_bytes=p.done_bytes,
                    total_bytes=p.total_bytes,
                    done_items=p.done_items,
                    total_items=p.total_items,
                )
            )

    checkpoint = open_checkpoint(source, store=store, progress=report)
    files = checkpoint.files
    tokenizer = Tokenizer.from_model_files(files)
    n_tensors = len(checkpoint.weights)

    def finished(phase: str) -> None:
        report(
            Progress(
                phase=phase,
                done_bytes=files.size_bytes,
                total_bytes=files.size_bytes,
                done_items=n_tensors,
                total_items=n_tensors,
            )
        )

    finished("build")
    chosen = default_execution() if execution == "auto" else execution
    model = _build(
        checkpoint.config, checkpoint.weights, checkpoint.quant, execution=chosen, name=files.name
    )
    finished("ready")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=checkpoint.config,
        name=files.name,
        model_type=str(checkpoint.config.get("model_type")),
        context_length=_context_length(model.args.max_position_embeddings, files.name),
        parameters=checkpoint.parameters,
        quantization=checkpoint.quantization,
        execution=chosen,
        size_bytes=files.size_bytes,
        digest=files.digest,
        modified_at=files.modified_at,
        load_seconds=time.perf_counter() - started,
        sampling_defaults=files.sampling_defaults,
        profile=files.profile,
    )


def _context_length(value: object, name: str) -> int:
    """config.json's ``max_position_embeddings`` as a context length, or a clear load error."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise ModelLoadError(
            f"{name}: invalid config.json (max_position_embeddings {value!r} is not a whole number)"
        )
    assert isinstance(value, int | float)
    if value < 1:
        raise ModelLoadError(
            f"{name}: invalid config.json (max_position_embeddings {value!r} is not positive)"
        )
    return int(value)


def build_model(
    config: dict[str, Any],
    tensors: TensorSet,
    *,
    execution: Literal["dense", "quantized"],
    name: str = "model",
) -> tuple[nn.Module, str]:
    """Check ``tensors`` and build the architecture from them; return (model, quantization)."""
    weights, quant = check_weights(name, config, tensors)
    model = _build(config, weights, quant, execution=execution, name=name)
    return model, quantization_label(weights, quant)


def _build(
    config: dict[str, Any],
    checked: dict[str, mx.array],
    quant: dict[str, tuple[int, int]],
    *,
    execution: Literal["dense", "quantized"],
    name: str,
) -> nn.Module:
    """The architecture holding ``checked`` weights (``check_weights``' output), evaluated."""
    model = instantiate(config, name)
    weights = dict(checked)
    if execution == "dense" or not quant:
        for path, (bits, group) in quant.items():
            # In float32: f16/bf16 scales would round the dequantized weights.
            w = mx.dequantize(
                weights.pop(path + ".weight"),
                weights.pop(path + ".scales").astype(mx.float32),
                weights.pop(path + ".biases").astype(mx.float32),
                group_size=group,
                bits=bits,
            )
            weights[path + ".weight"] = w.astype(mx.float32)
    else:
        nn.quantize(
            model,
            class_predicate=lambda p, m: (
                {"group_size": quant[p][1], "bits": quant[p][0]} if p in quant else False
            ),
        )
        adopt_quantized_linears(model)
    if mx.default_device() == mx.cpu:
        # Float32 on CPU: half-precision matmuls and scales are far slower there.
        for key, array in list(weights.items()):
            if mx.issubdtype(array.dtype, mx.floating):
                weights[key] = array.astype(mx.float32)
    model.load_weights(list(weights.items()), strict=True)
    try:
        mx.eval(model.parameters())
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot read tensor data ({exc})") from exc
    model.eval()
    return model
