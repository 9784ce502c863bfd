"""Qwen3 dense decoder, ``model_type: qwen3``: Llama with RMS norms on each query and key head.

Attribute names equal the checkpoint tensor names (``model.layers.0.self_attn.q_proj``...), so
``load_weights`` takes a HF/MLX checkpoint as-is.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from runtime.models.common import (
    CausalLM,
    Layout,
    Rope,
    normalize_config,
    split_heads,
    swiglu,
)
from runtime.models.decoder import DecoderLayer, DecoderStack
from runtime.models.fused import RMSNorm
from runtime.models.projections import gate_up, qkv


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
    head_dim: int | None = None
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in normalize_config(config).items() if k in names})

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.kv_heads
        head_dim = args.dims_per_head
        self.scale = head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = Rope(
            head_dim,
            base=args.rope_theta,
            traditional=args.rope_traditional,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, layout: Layout) -> mx.array:
        # RMSNorm normalizes the last axis, which is head_dim once the heads are split.
        q, k, v = qkv(self, x)
        q = self.q_norm(split_heads(q, self.n_heads))
        k = self.k_norm(split_heads(k, self.n_kv_heads))
        v = split_heads(v, self.n_kv_heads)
        out = layout.attend(q, k, v, layer=self.layer, rope=self.rope, scale=self.scale)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(*gate_up(self, x)))


def _layer(args: ModelArgs, index: int) -> DecoderLayer:
    return DecoderLayer(Attention(args, index), MLP(args), args)


class Model(CausalLM):
    FUSABLE_PROJECTIONS = True  # its layers project through ``qkv`` and ``gate_up``

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args, DecoderStack(args, _layer))
