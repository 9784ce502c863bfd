"""``show``: describe a stored model from its manifest, JSON blobs and safetensors headers.

Nothing is loaded: parameter counts and quantization come from the tensor headers (and their
``__metadata__``), so describing a model is fast and works on an Ollama store too, where the
quantization may have to be inferred from shapes the way Ollama does.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs

from runtime.errors import ModelLoadError
from runtime.formats.safetensors import check_safetensors
from runtime.store.layout import Store

_BITS = {"int4": 4, "q4": 4, "fp4": 4, "int8": 8, "q8": 8, "fp8": 8}


@attrs.frozen(kw_only=True)
class ModelInfo:
    name: str
    architecture: str  # config.json architectures[0], e.g. LlamaForCausalLM
    model_type: str  # llama, qwen2, ...
    parameters: int
    context_length: int
    embedding_length: int
    quantization: str  # "int4 g32", "F32", ...
    template: str | None  # the chat template (Jinja), if any
    size_bytes: int
    digest: str
    modified_at: float
    config: dict[str, Any]


def infer_bits(packed_cols: int, scale_cols: int, hint: str = "") -> tuple[int, int]:
    """(bits, group) of an affine-quantized weight from its shapes, as Ollama infers them."""
    g4, g8 = packed_cols * 8 // scale_cols, packed_cols * 4 // scale_cols
    if g4 == 32:
        return 4, 32
    if g8 == 64:
        return 8, 64
    if g4 == 64 and g8 == 32:
        return (8, 32) if hint == "8" else (4, 64)
    if g4 in (16, 32, 64, 128):
        return 4, g4
    return 8, g8


def _tensor_stats(header: dict[str, Any], meta: dict[str, str]) -> tuple[int, Counter[str]]:
    params = 0
    kinds: Counter[str] = Counter()
    for name, info in header.items():
        base = name.rpartition(".")[0]
        if name.endswith((".scale", ".bias")) and f"{base}.scale" in header:
            continue  # a quantized weight's scales or quantization biases
        shape = [int(x) for x in info.get("shape", [])]
        count = 1
        for dim in shape:
            count *= dim
        scale = header.get(f"{name}.scale")
        if scale is not None and shape:
            declared = meta.get(f"{name}.quant_type", meta.get("quant_type", "")).lower()
            group = meta.get(f"{name}.group_size", meta.get("group_size"))
            bits, g = infer_bits(shape[-1], int(scale["shape"][-1]), str(_BITS.get(declared, "")))
            if declared in _BITS:
                bits = _BITS[declared]
                g = int(group) if group else g
            params += count * 32 // bits
            kinds[f"int{bits} g{g}"] += 1
        else:
            params += count
            kinds[str(info.get("dtype", "?")).upper()] += 1
    return params, kinds


def describe(store: Store, name: str) -> ModelInfo:
    """Describe ``name`` (blob digests checked, as for a load; tensors read only by header)."""
    files = store.resolve(name)
    params = 0
    kinds: Counter[str] = Counter()
    for path in files.weight_files:
        header, meta = check_safetensors(path)
        p, k = _tensor_stats(header, meta)
        params += p
        kinds += k
    quantized = Counter({k: v for k, v in kinds.items() if k.startswith("int")})
    quant = (quantized or kinds).most_common(1)[0][0] if kinds else "?"
    config = files.config
    template = files.tokenizer_config.get("chat_template")
    if isinstance(template, list):  # HF's named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"model {files.name!r}: chat_template is not a string")
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    return ModelInfo(
        name=files.name,
        architecture=str(architectures[0]),
        model_type=str(config.get("model_type", "?")),
        parameters=params,
        context_length=int(config.get("max_position_embeddings", 0) or 0),
        embedding_length=int(config.get("hidden_size", 0) or 0),
        quantization=quant,
        template=template,
        size_bytes=files.size_bytes,
        digest=files.digest,
        modified_at=files.modified_at,
        config=config,
    )
