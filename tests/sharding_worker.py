"""One rank of ``test_sharding``'s two-process check (run as a script, not collected).

Builds the same tiny random model on every rank, takes its logits for a prompt whole, then
shards it over the ring group the environment describes and takes them again; prints this
rank's largest difference and how many weights its layers hold, and exits 1 past 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: F401  (BLAS before mlx)


def layer_weights(model: Any) -> int:
    """Numbers held by the model's layers (what sharding divides)."""
    from mlx.utils import tree_flatten

    total = 0
    for layer in model.model.layers:
        flat: list[tuple[str, Any]] = tree_flatten(layer.parameters())  # type: ignore[assignment]
        total += sum(int(array.size) for _, array in flat)
    return total


def main(model_type: str) -> int:
    import mlx.core as mx
    import numpy as np

    from runtime.formats.safetensors import TensorSet
    from runtime.models.loader import build_model
    from runtime.models.sharding import shard_model
    from runtime.testing.models import random_weights, tiny_config

    group = mx.distributed.init(backend="ring", strict=True)
    config = tiny_config(model_type)
    tensors = TensorSet(tensors=dict(random_weights(config, seed=1)), origins={}, quant={})
    model, _ = build_model(config, tensors, execution="dense")
    tokens = mx.array(np.random.default_rng(0).integers(0, 512, size=(1, 24)), dtype=mx.int32)
    whole = model(tokens)
    mx.eval(whole)
    before = layer_weights(model)
    layers = shard_model(model, group)
    after = layer_weights(model)
    diff = float(mx.abs(model(tokens) - whole).max())
    print(
        f"rank {group.rank()} of {group.size()}: {layers} layers, diff {diff:.2e}, "
        f"layer weights {after}/{before}",
        flush=True,
    )
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
