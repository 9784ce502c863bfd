"""Ministral 3 decoder, ``model_type: ministral3``, and the text part of ``mistral3`` configs
(Ministral 3, Mistral Small 3.1+ with their vision tower, which is not read).

Mistral's layers (``runtime.models.mistral``) with YaRN RoPE (``common.Rope``). Ministral 3
also scales queries by ``1 + beta * log(1 + floor(position / original_context))``
(``llama_4_scaling_beta``), which is exactly 1 below the original context; this module serves
that much context (16K for the released models) rather than the scaled one, so its outputs are
the reference model's everywhere it runs. A ``mistral3`` config nests the text config under
``text_config`` and its checkpoint prefixes the text tensors with ``language_model.``.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx

from runtime.errors import ModelLoadError
from runtime.models.common import normalize_config
from runtime.models.llama import Model as LlamaModel
from runtime.models.mistral import ModelArgs as MistralArgs

_TEXT_MODELS = ("ministral3", "mistral")


@attrs.frozen(kw_only=True)
class ModelArgs(MistralArgs):
    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        text = config.get("text_config")
        if isinstance(text, dict):  # mistral3: the text model's config inside
            kind = text.get("model_type", "mistral")
            if kind not in _TEXT_MODELS:
                raise ModelLoadError(
                    f"unsupported mistral3 text model_type {kind!r}; supported: "
                    f"{', '.join(_TEXT_MODELS)}"
                )
            config = {"tie_word_embeddings": False, **text, "model_type": config["model_type"]}
        else:
            config = {"tie_word_embeddings": True, **config}
        config = normalize_config(config)
        params = config.get("rope_parameters") or config.get("rope_scaling") or {}
        original = params.get("original_max_position_embeddings")
        if params.get("llama_4_scaling_beta") and original:
            longest = config.get("max_position_embeddings") or original
            config["max_position_embeddings"] = min(int(longest), int(original))
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class Model(LlamaModel):
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        text = {
            key.removeprefix("language_model."): value
            for key, value in weights.items()
            if not key.startswith(("vision_tower.", "multi_modal_projector."))
        }
        return super().sanitize(text)
