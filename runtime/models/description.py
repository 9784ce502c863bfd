"""What ``mlxrunner show`` says about a model, taken from its checked checkpoint.

``describe`` resolves the source the way a load does (``runtime.models.source``), so the
parameter count and quantization it reports are the ones ``import`` and a load report. No
model is built and no safetensors data is read, only headers; a GGUF file is decoded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from runtime.models.source import open_checkpoint
from runtime.store.layout import Store
from runtime.text.chat_template import configured_template


@attrs.frozen(kw_only=True)
class ModelDescription:
    """A model as ``show`` describes it (a stored model, a folder or a GGUF file)."""

    name: str
    architecture: str  # config.json architectures[0], e.g. LlamaForCausalLM
    model_type: str  # llama, qwen2, ...
    parameters: int
    context_length: int
    embedding_length: int
    quantization: str  # "int4 g32", "F32", ...
    template: str | None  # the chat template (Jinja), if any
    sampling_defaults: dict[str, float | int]  # from generation_config.json
    size_bytes: int
    digest: str  # the manifest's, for a stored model; "" otherwise
    modified_at: float
    config: dict[str, Any]


def describe(source: str | Path, *, store: Store | None = None) -> ModelDescription:
    """Describe ``source``: a name in ``store`` (default: the default store), a folder or a
    ``.gguf`` file. A stored model's blobs are checked against their digests, as for a load."""
    checkpoint = open_checkpoint(source, store=store)
    files, config = checkpoint.files, checkpoint.config
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    # A vision model's config (gemma3) nests the text model's sizes.
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    return ModelDescription(
        name=files.name,
        architecture=str(architectures[0]),
        model_type=str(config.get("model_type", "?")),
        parameters=checkpoint.parameters,
        context_length=int(text.get("max_position_embeddings", 0) or 0),
        embedding_length=int(text.get("hidden_size", 0) or 0),
        quantization=checkpoint.quantization,
        template=configured_template(files.tokenizer_config),
        sampling_defaults=files.sampling_defaults,
        size_bytes=files.size_bytes,
        digest=files.digest,
        modified_at=files.modified_at,
        config=config,
    )
