"""Random-weight llama models of real sizes for the GPU benchmarks and checks.

Owns the configurations (8B-class, 1B-class and a tiny one for CPU runs), the random weights
(bf16, optionally quantized q4 group 64 with ``mx.quantize``), a tokenizer whose vocabulary
matches the model's (the in-process test tokenizer padded with reserved tokens, so every id
the model can sample decodes to text), and the two ways the benchmarks use them: a model
folder on disk for ``mlxrunner serve``, or the same arrays loaded in-process into our model
class (``runtime.models.loader.build_model``) and into mlx-lm's, sharing memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from runtime.formats.safetensors import TensorSet
from runtime.models import architecture
from runtime.models.checkpoint import flat_parameters
from runtime.models.loader import LoadedModel, build_model
from runtime.testing.tokenizers import tokenizer_config, train_tokenizer
from runtime.text.tokenizer import Tokenizer

_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
CONFIGS: dict[str, dict[str, Any]] = {
    # Llama-3-8B's shapes: 8.03B parameters, 16.06 GB in bf16.
    "8b": {
        **_LLAMA,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    # Llama-3.2-1B's shapes: 1.24B parameters, 2.5 GB in bf16.
    "1b": {
        **_LLAMA,
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    # Small enough for a CPU run of every code path.
    "tiny": {
        **_LLAMA,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "vocab_size": 2048,
        "tie_word_embeddings": False,
    },
}
GROUP_SIZE = 64
BITS = 4


def random_weights(
    config: dict[str, Any], dtype: mx.Dtype, *, seed: int = 0
) -> dict[str, mx.array]:
    """Checkpoint-named random weights: matrices ~ N(0, 0.02), norms 1 (HF's llama init)."""
    module = architecture(config)
    # The model is built for its parameter names and shapes only; its own lazy random
    # initialisation is never evaluated, so it costs no memory.
    template = module.Model(module.ModelArgs.from_dict(config))
    shapes = {k: v.shape for k, v in sorted(flat_parameters(template).items())}
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights: dict[str, mx.array] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            weights[name] = mx.ones(shape, dtype=dtype)
        else:
            weights[name] = mx.random.normal(shape, dtype=dtype, scale=0.02, key=keys[i])
        mx.eval(weights[name])  # one tensor at a time keeps the peak at the final size
    return weights


def quantized(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Every matrix (projections, embedding, head) as q4 group 64 in mlx-lm's layout."""
    out: dict[str, mx.array] = {}
    for name, array in weights.items():
        if array.ndim == 2 and array.shape[-1] % GROUP_SIZE == 0:
            module = name.removesuffix(".weight")
            w, scales, biases = mx.quantize(array, group_size=GROUP_SIZE, bits=BITS)
            out |= {f"{module}.weight": w, f"{module}.scales": scales, f"{module}.biases": biases}
            mx.eval(w, scales, biases)
        else:
            out[name] = array
    return out


def padded_tokenizer_json(vocab_size: int) -> str:
    """The test tokenizer with ``<|reserved_N|>`` entries up to ``vocab_size`` ids."""
    spec = json.loads(train_tokenizer())
    vocab: dict[str, int] = spec["model"]["vocab"]
    used = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    if used > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {used} tokens")
    # Plain vocabulary entries (no merges reach them): they decode, byte-level, to their text.
    vocab |= {f"<|reserved_{i}|>": i for i in range(used, vocab_size)}
    return json.dumps(spec, ensure_ascii=False)


def write_folder(path: Path, config: dict[str, Any], weights: dict[str, mx.array]) -> Path:
    """A model folder ``mlxrunner serve --model`` (and ``mlx_lm``) loads."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    full = dict(config)
    if any(k.endswith(".scales") for k in weights):
        full["quantization"] = {"group_size": GROUP_SIZE, "bits": BITS}
    (path / "config.json").write_text(json.dumps(full, indent=2))
    (path / "tokenizer.json").write_text(padded_tokenizer_json(int(config["vocab_size"])))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    return path


def bf16_folder(size: str, parent: Path) -> Path:
    """``parent/random-llama-<size>-bf16``: the random ``size`` llama, written on first use."""
    folder = parent / f"random-llama-{size}-bf16"
    if (folder / "config.json").exists():
        return folder
    started = time.perf_counter()
    config = CONFIGS[size]
    partial = folder.with_name(folder.name + ".partial")
    write_folder(partial, config, random_weights(config, mx.bfloat16))
    partial.rename(folder)  # a folder is complete or absent, even after an interrupted write
    mx.clear_cache()
    print(f"wrote {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def no_eos_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer with no end-of-sequence ids: every sequence runs to its token limit, as
    mlx-lm's generators do when given no stop tokens."""
    import tokenizers

    return Tokenizer(
        tokenizers.Tokenizer.from_str(padded_tokenizer_json(vocab_size)),
        bos_id=None,
        eos_ids=frozenset(),
        add_bos=False,
        chat_template=None,
    )


def loaded_in_memory(
    config: dict[str, Any], weights: dict[str, mx.array], name: str
) -> LoadedModel:
    """Our model class over ``weights`` (shared, not copied) through the loader's own build."""
    started = time.perf_counter()
    quant = any(k.endswith(".scales") for k in weights)
    tensors = TensorSet(tensors=dict(weights), origins={}, quant={})
    model, stored = build_model(
        config, tensors, execution="quantized" if quant else "dense", name=name
    )
    params = flat_parameters(model)
    return LoadedModel(
        model=model,
        tokenizer=no_eos_tokenizer(int(config["vocab_size"])),
        config=config,
        name=name,
        model_type=str(config["model_type"]),
        context_length=int(config["max_position_embeddings"]),
        parameters=parameter_count(params),
        quantization=stored,
        execution="quantized" if quant else "dense",
        size_bytes=sum(v.nbytes for v in params.values()),
        digest="",
        modified_at=time.time(),
        load_seconds=time.perf_counter() - started,
    )


def mlx_lm_model(config: dict[str, Any], ours: nn.Module) -> nn.Module:
    """mlx-lm's llama over the very arrays our model holds (after our loader's conversions)."""
    from mlx_lm.models import llama as mlx_lm_llama

    params = flat_parameters(ours)
    model = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(config))
    quantized_paths = {k.removesuffix(".scales") for k in params if k.endswith(".scales")}
    if quantized_paths:
        nn.quantize(
            model,
            group_size=GROUP_SIZE,
            bits=BITS,
            class_predicate=lambda path, _: path in quantized_paths,
        )
    model.load_weights(list(params.items()), strict=True)
    model.eval()
    return model


def parameter_count(params: dict[str, mx.array]) -> int:
    packed = 32 // BITS  # q4 values per uint32
    return sum(
        v.size * (packed if v.dtype == mx.uint32 else 1)
        for k, v in params.items()
        if not k.endswith((".scales", ".biases"))
    )


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for v in flat_parameters(model).values())
