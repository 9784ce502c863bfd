"""Tensor parallelism (``runtime/models/sharding.py``): two ranks give the whole model's logits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import pytest

from runtime.formats.safetensors import TensorSet
from runtime.models.loader import build_model
from runtime.models.sharding import shard_model
from runtime.testing.models import random_weights, tiny_config

WORKER = Path(__file__).with_name("sharding_worker.py")


@attrs.frozen
class _Ranks:
    count: int

    def size(self) -> int:
        return self.count


def _model(model_type: str = "llama") -> Any:
    config = tiny_config(model_type)
    tensors = TensorSet(tensors=dict(random_weights(config)), origins={}, quant={})
    model, _ = build_model(config, tensors, execution="dense")
    return model


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_a_group_of_one_leaves_the_model_alone() -> None:
    model = _model()
    assert shard_model(model, mx.distributed.init()) == 0
    assert "weight" in model.model.layers[0].self_attn.q_proj


def test_heads_that_do_not_divide_are_refused() -> None:
    with pytest.raises(ValueError, match="2 key-value heads cannot be split 4 ways"):
        shard_model(_model(), _Ranks(4))
    with pytest.raises(ValueError, match="no separate q_proj, k_proj, v_proj"):
        shard_model(_model("phi3"), _Ranks(2))  # its checkpoint fuses q, k and v


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_two_ranks_compute_the_whole_models_logits(model_type: str, tmp_path: Path) -> None:
    """Two processes on MLX's ring backend (loopback TCP): each holds half of every layer's
    weights, and the logits equal the unsharded model's."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in _free_ports(2)]))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), model_type],
            env=os.environ | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        outputs.append(out)
        assert proc.returncode == 0, out
    for rank, out in enumerate(outputs):
        assert f"rank {rank} of 2: 2 layers" in out
        held, whole = out.rsplit("layer weights ", 1)[1].split()[0].split("/")
        # Half of the projections' weights, plus the norms every rank keeps whole.
        assert int(held) < 0.55 * int(whole)
