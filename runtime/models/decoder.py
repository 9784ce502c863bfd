"""The pre-norm decoder stack that llama, Qwen2, Qwen3 and Phi-3 share.

Each architecture brings its own attention and MLP; the rest is the same in all four: every
layer adds the attention of its RMS-normed input, then the MLP of the RMS-normed result, and
the stack is the token embeddings, the layers, and a final RMSNorm. The module and parameter
names are the checkpoints' (``self_attn``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``; ``embed_tokens``, ``layers``, ``norm``), which loading and
``runtime.models.sharding`` rely on. Gemma 3 norms and scales differently and keeps its own.

On CUDA, for half-precision weights, the stack runs each residual add together with the norm
that follows it (``runtime.models.residual_norm``): every layer gets its input already normed
and returns its output normed for the next layer, the last one by the final norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from runtime.models.common import Layout
from runtime.models.fused import RMSNorm
from runtime.models.residual_norm import add_rms_norm, applies


class DecoderLayer(nn.Module):
    """One layer: ``h = x + attention(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, args: Any) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, layout: Layout) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), layout)
        out: mx.array = h + self.mlp(self.post_attention_layernorm(h))
        return out

    def fused(
        self, x: mx.array, normed: mx.array, layout: Layout, after: nn.RMSNorm
    ) -> tuple[mx.array, mx.array]:
        """The layer on ``x`` whose ``input_layernorm`` is ``normed``; returns its output and
        that output normed by ``after`` (the next layer's input norm, or the final one), each
        residual add and the norm after it one kernel (``runtime.models.residual_norm``)."""
        norm = self.post_attention_layernorm
        h, normed_h = add_rms_norm(x, self.self_attn(normed, layout), norm.weight, norm.eps)
        return add_rms_norm(h, self.mlp(normed_h), after.weight, after.eps)


class DecoderStack(nn.Module):
    """Embeddings, ``args.num_hidden_layers`` layers made by ``layer(args, index)``, final norm."""

    def __init__(self, args: Any, layer: Callable[[Any, int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [layer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, layout: Layout) -> mx.array:
        h = self.embed_tokens(inputs)
        if self._fusable(h):
            normed = self.layers[0].input_layernorm(h)
            after = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
            for layer, norm in zip(self.layers, after, strict=True):
                h, normed = layer.fused(h, normed, layout, norm)
            return normed
        for layer in self.layers:
            h = layer(h, layout)
        out: mx.array = self.norm(h)
        return out

    def _fusable(self, h: mx.array) -> bool:
        """Whether every add and the norm after it can run as one kernel here."""
        norms = [self.norm]
        for layer in self.layers:
            if type(layer) is not DecoderLayer:  # (a subclass may add or norm otherwise)
                return False
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        return all(isinstance(n, nn.RMSNorm) and applies(h, n.weight) for n in norms)
