"""Gemma 3 text decoder, ``model_type: gemma3_text``, and the text part of ``gemma3`` configs.

Differences from Llama: embeddings scaled by ``sqrt(hidden_size)``; RMS norms that scale by
``1 + weight``, four per layer (before and after attention and MLP) plus one on each query and
key head; a GELU-gated MLP; attention scaled by ``query_pre_attn_scalar``; and five of every
six layers (``sliding_window_pattern``) attending to a sliding window with their own RoPE base
(``rope_local_base_freq``, no scaling), the others globally; newer configs list each layer's
kind in ``layer_types`` instead.

A ``gemma3`` (vision + text) config nests the text config under ``text_config`` and its
checkpoint prefixes the text tensors with ``language_model.``; ``ModelArgs.from_dict`` and
``Model.sanitize`` take the text part and drop the vision tower.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from runtime.models.common import CausalLM, Layout, Rope, normalize_config, split_heads
from runtime.models.fused import rms_norm
from runtime.models.projections import gate_up, qkv


@attrs.frozen(kw_only=True)
class ModelArgs:
    # Defaults are transformers' Gemma3TextConfig's: gemma3 configs leave many of them out.
    model_type: str
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262208
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: tuple[str, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(tuple)
    )
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        text = config.get("text_config")
        if isinstance(text, dict):  # gemma3: the text model's config, the vocabulary outside
            outer: dict[str, Any] = {
                k: config[k] for k in ("vocab_size", "tie_word_embeddings") if k in config
            }
            config = {**text, **outer, "model_type": config.get("model_type", "gemma3")}
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in normalize_config(config).items() if k in names})

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def dims_per_head(self) -> int:
        return self.head_dim

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is not None and layer < len(self.layer_types):
            return self.layer_types[layer] == "sliding_attention"
        return (layer + 1) % self.sliding_window_pattern != 0


class RMSNorm(nn.Module):
    """Gemma's RMS norm: the checkpoint stores ``weight`` and the norm scales by ``1 + weight``."""

    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.kv_heads
        dim, head_dim = args.hidden_size, args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.window: int | None = None
        if args.is_sliding(layer):
            self.window = args.sliding_window
            self.rope = Rope(head_dim, base=args.rope_local_base_freq)
        else:
            self.rope = Rope(
                head_dim,
                base=args.rope_theta,
                scaling=args.rope_scaling,
                max_position_embeddings=args.max_position_embeddings,
            )

    def __call__(self, x: mx.array, layout: Layout) -> mx.array:
        q, k, v = qkv(self, x)
        q = self.q_norm(split_heads(q, self.n_heads))
        k = self.k_norm(split_heads(k, self.n_kv_heads))
        v = split_heads(v, self.n_kv_heads)
        out = layout.attend(
            q, k, v, layer=self.layer, rope=self.rope, scale=self.scale, window=self.window
        )
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(_gelu_gate(*gate_up(self, x)))


@partial(mx.compile, shapeless=True)
def _gelu_gate(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def _residual(x: mx.array, y: mx.array) -> mx.array:
    # Gemma's activations outgrow float16: add in float32 and clip to float16's range.
    if x.dtype != mx.float16:
        return x + y
    bound = mx.finfo(mx.float16).max
    return mx.clip(x.astype(mx.float32) + y.astype(mx.float32), -bound, bound).astype(mx.float16)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(self, x: mx.array, layout: Layout) -> mx.array:
        r = self.self_attn(self.input_layernorm(x), layout)
        h = _residual(x, self.post_attention_layernorm(r))
        r = self.mlp(self.pre_feedforward_layernorm(h))
        return _residual(h, self.post_feedforward_layernorm(r))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # The checkpoints' reference rounds the scale to bfloat16.
        self._embed_scale = mx.array(args.hidden_size**0.5, mx.bfloat16)

    def __call__(self, inputs: mx.array, layout: Layout) -> mx.array:
        h = self.embed_tokens(inputs)
        h = h * self._embed_scale.astype(h.dtype)
        for layer in self.layers:
            h = layer(h, layout)
        return self.norm(h)


class Model(CausalLM):
    FUSABLE_PROJECTIONS = True  # its layers project through ``qkv`` and ``gate_up``

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args, Gemma3Model(args))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for key, value in weights.items():
            if key.startswith(("vision_tower.", "multi_modal_projector.")):
                continue
            key = key.removeprefix("language_model.")
            if "rotary_emb.inv_freq" in key:
                continue
            if self.args.tie_word_embeddings and key.startswith("lm_head."):
                continue
            out[key] = value
        return out
