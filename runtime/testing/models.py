"""Tiny real models for tests: random weights (float or quantized, under mlx-lm's or Ollama's
tensor names) and real HF/MLX folders of them with a trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from runtime.models import architecture
from runtime.models.checkpoint import flat_parameters

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
    "qwen3": {
        "model_type": "qwen3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    # Layer 0 slides over 8 positions, layer 1 attends globally (linear RoPE scaling).
    "gemma3_text": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    # Phi-4-mini's shape in small: partial rotary embeddings with longrope scaling.
    "phi3": {
        "model_type": "phi3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5],
        },
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
    # Ministral's interleaving in small: layer 0 slides over 8 positions.
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
    # YaRN RoPE; served up to the original context (128), where the llama 4 scaling is 1.
    "ministral3": {
        "model_type": "ministral3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "yarn",
            "type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
        "tie_word_embeddings": True,
    },
}


def tiny_config(
    model_type: str = "llama", *, vocab_size: int = 512, **overrides: Any
) -> dict[str, Any]:
    return {**TINY_CONFIGS[model_type], "vocab_size": vocab_size, **overrides}


def random_weights(config: dict[str, Any], *, seed: int = 0) -> dict[str, mx.array]:
    """Float32 random weights with the checkpoint names of ``config``'s architecture."""
    mx.random.seed(seed)
    module = architecture(config)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = flat_parameters(model)
    # Norm weights start at 1; perturb them so a wrong norm placement changes the logits.
    return {
        k: (v + 0.1 * mx.random.normal(v.shape) if "norm" in k else v).astype(mx.float32)
        for k, v in weights.items()
    }


def quantize_weights(
    config: dict[str, Any], weights: dict[str, mx.array], *, bits: int, group_size: int
) -> dict[str, mx.array]:
    """mlx-lm layout (``.weight``/``.scales``/``.biases``) of every Linear and the embedding."""
    module = architecture(config)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.load_weights(list(weights.items()))
    nn.quantize(model, group_size=group_size, bits=bits)
    return flat_parameters(model)


def ollama_names(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx-lm quantized names -> Ollama's (``.weight.scale`` / ``.weight.bias``)."""
    out = {}
    for name, array in weights.items():
        if name.endswith(".scales"):
            out[name.removesuffix(".scales") + ".weight.scale"] = array
        elif name.endswith(".biases"):
            out[name.removesuffix(".biases") + ".weight.bias"] = array
        else:
            out[name] = array
    return out


def make_tiny_folder(
    path: Path,
    model_type: str = "llama",
    *,
    tokenizer_json: str | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    quantize: tuple[int, int] | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a loadable model folder: config.json, model.safetensors, tokenizer files.

    ``quantize=(bits, group_size)`` writes an MLX-quantized checkpoint.
    """
    if tokenizer_json is None:
        from runtime.testing.tokenizers import tokenizer_config as default_tok_config
        from runtime.testing.tokenizers import train_tokenizer

        tokenizer_json = train_tokenizer()
        tokenizer_config = tokenizer_config or default_tok_config()
    vocab = json.loads(tokenizer_json)
    vocab_size = len(vocab["model"]["vocab"]) + len(
        [t for t in vocab.get("added_tokens", []) if t["id"] >= len(vocab["model"]["vocab"])]
    )
    config = tiny_config(model_type, vocab_size=vocab_size, **overrides)
    weights = random_weights(config, seed=seed)
    if quantize is not None:
        bits, group = quantize
        weights = quantize_weights(config, weights, bits=bits, group_size=group)
        config["quantization"] = {"group_size": group, "bits": bits}
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text(tokenizer_json)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}, indent=2))
    return path
