"""Mistral / Ministral decoder, ``model_type: mistral`` (and ``ministral``): Llama's layers.

What differs is the sliding window, as transformers reads these configs: a ``sliding_window``
applies to every layer unless ``layer_types`` says which layers slide (Ministral's interleaved
layers). A window as long as the context changes nothing and is dropped, so such layers keep
the engine's fastest attention path.
"""

from __future__ import annotations

import attrs

from runtime.models.llama import Model
from runtime.models.llama import ModelArgs as LlamaArgs

__all__ = ["Model", "ModelArgs"]


@attrs.frozen(kw_only=True)
class ModelArgs(LlamaArgs):
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False

    def window(self, layer: int) -> int | None:
        w = self.sliding_window
        if w is None or w >= self.max_position_embeddings:
            return None
        if self.layer_types is None:
            return w
        return super().window(layer)
