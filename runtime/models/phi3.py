"""Phi-3 / Phi-3.5 / Phi-4-mini decoder, ``model_type: phi3``.

Llama's layers with the q/k/v projections fused into one ``qkv_proj`` and the gate and up
projections into one ``gate_up_proj`` (gate first); RoPE may rotate only part of each head
(``partial_rotary_factor``, Phi-4-mini) and may use ``longrope`` scaling (``common.Rope``).
A ``sliding_window`` in the config limits attention as it does in transformers' Phi-3.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from runtime.models.common import CausalLM, Layout, Rope, normalize_config, split_heads, swiglu
from runtime.models.decoder import DecoderLayer, DecoderStack


@attrs.frozen(kw_only=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    num_key_value_heads: int | None = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in normalize_config(config).items() if k in names})

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dims_per_head(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window(self) -> int | None:
        """The sliding window, if it is shorter than the context (else it changes nothing)."""
        w = self.sliding_window
        return w if w is not None and w < self.max_position_embeddings else None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.kv_heads
        head_dim = args.dims_per_head
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.window = args.window
        out = (self.n_heads + 2 * self.n_kv_heads) * head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, out, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, args.hidden_size, bias=False)
        scaling = args.rope_scaling
        if scaling is not None and scaling.get("type", scaling.get("rope_type")) in (
            "longrope",
            "su",
        ):
            original = args.original_max_position_embeddings
            scaling = {"original_max_position_embeddings": original, **scaling}
        self.rope = Rope(
            int(head_dim * args.partial_rotary_factor),
            base=args.rope_theta,
            traditional=args.rope_traditional,
            scaling=scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, layout: Layout) -> mx.array:
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_end, k_end], axis=-1)
        q = split_heads(q, self.n_heads)
        k = split_heads(k, self.n_kv_heads)
        v = split_heads(v, self.n_kv_heads)
        out = layout.attend(
            q, k, v, layer=self.layer, rope=self.rope, scale=self.scale, window=self.window
        )
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


def _layer(args: ModelArgs, index: int) -> DecoderLayer:
    return DecoderLayer(Attention(args, index), MLP(args), args)


class Model(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args, DecoderStack(args, _layer))
