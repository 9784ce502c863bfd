"""Tensor parallelism: a model's layers split across the ranks of an MLX distributed group.

The split is Megatron's, as mlx-lm's ``shard`` methods make it. In every layer, Q, K, V and
the MLP's gate and up projections are "all-to-sharded": each rank computes its own attention
heads and its own slice of the MLP's hidden units from the whole input. O and the down
projection are "sharded-to-all": each rank multiplies its slice and the group sums the
partial products. A layer then costs two all-sums, and each rank holds 1/N of the layer
weights and, since its K and V have 1/N of the heads, of the KV cache. Embeddings, norms and
the unembedding stay whole on every rank.

``serve`` runs one process on one device today; this keeps the architectures' code shardable
(no layer hard-codes its head count or fuses what must be split) and is checked with two
processes on the CPU (``tests/test_sharding.py``). An engine would shard before it fuses
projections: a fused layer is refused here, because its rows mix the parts' outputs.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

_BY_INPUT = ("q_proj", "k_proj", "v_proj")  # all-to-sharded: each rank its own heads
_MLP_IN = ("gate_proj", "up_proj")  # all-to-sharded: each rank its slice of hidden units


def shard_model(model: nn.Module, group: Any) -> int:
    """Split every layer of ``model`` (an architecture's ``Model``) across ``group``'s ranks
    in place; returns how many layers were split (0 for a group of one).

    ``ValueError`` when the model cannot be split ``group.size()`` ways: its attention or
    key-value heads, or its MLP width, are not a multiple of it, or a layer's projections are
    fused in one matrix (Phi-3's checkpoint layout, or an engine's fusion).
    """
    ranks = int(group.size())
    if ranks == 1:
        return 0
    layers = model.model.layers
    for index, layer in enumerate(layers):
        _check(index, layer, ranks)
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        for name in _BY_INPUT:
            attention[name] = shard_linear(attention[name], "all-to-sharded", group=group)
        attention["o_proj"] = shard_linear(attention["o_proj"], "sharded-to-all", group=group)
        attention.n_heads //= ranks
        attention.n_kv_heads //= ranks
        for name in _MLP_IN:
            mlp[name] = shard_linear(mlp[name], "all-to-sharded", group=group)
        mlp["down_proj"] = shard_linear(mlp["down_proj"], "sharded-to-all", group=group)
    mx.eval(model.parameters())  # the slices, so the whole matrices can be freed
    return len(layers)


def _check(index: int, layer: nn.Module, ranks: int) -> None:
    attention, mlp = layer.self_attn, layer.mlp
    missing = [n for n in (*_BY_INPUT, "o_proj") if n not in attention]
    missing += [n for n in (*_MLP_IN, "down_proj") if n not in mlp]
    if missing:
        raise ValueError(
            f"layer {index} cannot be sharded: no separate {', '.join(missing)} "
            "(fused projections are split by rows that mix the parts)"
        )
    heads, kv_heads = int(attention.n_heads), int(attention.n_kv_heads)
    hidden = int(mlp["gate_proj"]["weight"].shape[0])
    for what, count in (("attention heads", heads), ("key-value heads", kv_heads)):
        if count % ranks:
            raise ValueError(f"{count} {what} cannot be split {ranks} ways")
    if hidden % ranks:
        raise ValueError(f"an MLP of {hidden} hidden units cannot be split {ranks} ways")
