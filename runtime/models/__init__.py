"""Models: the architectures and the way from a model source to a running model.

The architectures are one module per HF ``model_type`` (``llama``, ``qwen2``, ``qwen3``,
``gemma3``, ``phi3``, ``mistral``, ``ministral3``), each
exporting ``Model`` and ``ModelArgs``, registered here with the ``model_type`` aliases that
share their layers. ``source`` resolves a folder, GGUF file or store name into a
``checkpoint`` (its tensors checked against the architecture); ``loader`` builds a running
model from it and ``description`` describes it for ``show``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from runtime.errors import ModelLoadError
from runtime.models import gemma3, llama, ministral3, mistral, phi3, qwen2, qwen3

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma3": gemma3,
    "phi3": phi3,
    "mistral": mistral,
    "ministral3": ministral3,
}

# Configs whose layers are another architecture's under another name (``gemma3``,
# ``mistral3``: the text part of the vision model).
ALIASES = {
    "smollm2": "llama",
    "gemma3_text": "gemma3",
    "ministral": "mistral",
    "mistral3": "ministral3",
}


def architecture(config: dict[str, Any]) -> ModuleType:
    """The module implementing ``config["model_type"]``, or a ``ModelLoadError`` naming the options."""
    model_type = str(config.get("model_type", ""))
    module = ARCHITECTURES.get(ALIASES.get(model_type, model_type))
    if module is None:
        supported = ", ".join(sorted([*ARCHITECTURES, *ALIASES]))
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}; supported model types: {supported}"
        )
    return module
