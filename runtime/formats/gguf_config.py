"""The HF ``config.json`` of a GGUF file, from its metadata (llama.cpp's key names).

``arch_config`` reads ``<arch>.*`` keys as hostile input: every number must be a positive
integer or a finite positive float, and ``block_count``, the one number that sizes a loop
before the tensors are checked against it, may not exceed the file's tensor count. llama 3's
per-frequency RoPE divisors (the ``rope_freqs`` tensor) become HF's ``rope_scaling``, and so
do Phi-3's longrope factors (``rope_factors_long`` / ``rope_factors_short``).

What llama.cpp fixes in code rather than metadata is filled in as llama.cpp does: Gemma 3's
local RoPE base (10000), its pattern of one global layer in six and its attention scale
(``head_dim``, or ``hidden / heads`` for the 62-layer 27B). Mistral files are ``llama``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ModelLoadError
from runtime.formats.gguf_file import TensorInfo
from runtime.formats.model_files import POOLING_KEY

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "phi3", "qwen2", "qwen3")
# 1-D float32 tensors that carry RoPE frequency factors (read apart from the weights).
FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# llama.cpp's enum llama_pooling_type: 1 mean, 2 cls, 3 last (0 none, 4 rank: our default).
_GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}


def arch_config(
    path: Path, meta: dict[str, Any], infos: dict[str, TensorInfo], factors: dict[str, np.ndarray]
) -> dict[str, Any]:
    """config.json for the file's architecture; ``infos`` are its weights, ``factors`` its
    ``FACTOR_TENSORS`` by name."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: float | None = None, *, kind: type = int) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: missing metadata {arch}.{key}")
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and kind is int:  # is_integer: nan and inf are not
            ok = not (isinstance(value, float) and not value.is_integer()) and value > 0
        elif ok:  # finite as the float32 the model computes with
            ok = math.isfinite(_short_float(value)) and value > 0
        if not ok:
            raise ModelLoadError(f"{path}: metadata {arch}.{key} = {value!r} is not valid")
        return kind(value)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    # Phi-3's metadata has no key_length; its heads split the width.
    head_dim = hidden // heads if arch == "phi3" else get("attention.key_length", hidden // heads)
    if head_dim % 2:
        raise ModelLoadError(f"{path}: head dimension {head_dim} is odd (RoPE needs pairs)")
    embed = infos.get("token_embd.weight")
    if embed is None:
        raise ModelLoadError(f"{path}: missing tensor 'token_embd.weight'")
    config: dict[str, Any] = {
        "model_type": _MODEL_TYPES.get(arch, arch),
        "architectures": [_HF_CLASSES[arch]],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _short_float(
            get("attention.layer_norm_rms_epsilon", _RMS_EPS.get(arch), kind=float)
        ),
        "rope_theta": _short_float(get("rope.freq_base", _ROPE_BASE[arch], kind=float)),
        "max_position_embeddings": get("context_length"),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in infos,
    }
    pooling = _GGUF_POOLING.get(meta.get(f"{arch}.pooling_type"))  # type: ignore[arg-type]
    if pooling is not None:
        config[POOLING_KEY] = pooling
    if config["num_hidden_layers"] > len(infos):  # it sizes the loop over expected tensors
        raise ModelLoadError(
            f"{path}: metadata {arch}.block_count = {config['num_hidden_layers']} but the file "
            f"has only {len(infos)} tensors"
        )
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        if arch != "phi3" or rope_dims > head_dim or rope_dims % 2:
            raise ModelLoadError(
                f"{path}: rotary dimensions {rope_dims} of head size {head_dim} not supported"
            )
        config["partial_rotary_factor"] = rope_dims / head_dim
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if arch == "phi3":
        _phi3(path, config, meta, get, factors, rope_dims)
        scaling = "none"  # longrope comes from the factor tensors, not from this key
    if arch == "gemma3":
        _gemma3(path, config, meta, get)
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": get("rope.scaling.factor", kind=float),
        }
    elif scaling != "none":
        raise ModelLoadError(f"{path}: unsupported RoPE scaling {scaling!r}")
    rope_freqs = factors.get("rope_freqs.weight")
    if rope_freqs is not None:
        config["rope_scaling"] = _llama3_scaling(path, rope_freqs, config["rope_theta"], head_dim)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in infos
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in infos
    return config


_HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_MODEL_TYPES = {"gemma3": "gemma3_text"}  # HF's name for Gemma 3's text-only model
_ROPE_BASE = {"llama": 10000.0, "qwen2": 1e6, "qwen3": 1e6, "gemma3": 1e6, "phi3": 10000.0}
_RMS_EPS = {"gemma3": 1e-6}  # where the metadata may leave it out
_GEMMA3_27B_LAYERS = 62


def _gemma3(path: Path, config: dict[str, Any], meta: dict[str, Any], get: Any) -> None:
    """Gemma 3's keys as llama.cpp and Ollama write them (Ollama's older files leave out the
    norm epsilon, name the RoPE bases differently and drop the 4B+ models' linear x8 RoPE
    scaling, which their 128K context gives away)."""

    def has(key: str) -> bool:
        return f"gemma3.{key}" in meta

    config["sliding_window"] = get("attention.sliding_window")
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: True slides
        if len(pattern) != config["num_hidden_layers"] or not all(
            isinstance(p, bool) for p in pattern
        ):
            raise ModelLoadError(
                f"{path}: metadata gemma3.attention.sliding_window_pattern is not one flag "
                "per layer"
            )
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        config["sliding_window_pattern"] = get("attention.sliding_window_pattern", 6)
    global_base = "rope.global.freq_base" if has("rope.global.freq_base") else "rope.freq_base"
    config["rope_theta"] = _short_float(get(global_base, 1e6, kind=float))
    local_base = "rope.local.freq_base" if has("rope.local.freq_base") else "rope.freq_base_swa"
    config["rope_local_base_freq"] = _short_float(get(local_base, 10000.0, kind=float))
    if not has("rope.scaling.type") and config["max_position_embeddings"] >= 131072:
        config["rope_scaling"] = {"type": "linear", "factor": 8.0}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    big = config["num_hidden_layers"] == _GEMMA3_27B_LAYERS
    config["query_pre_attn_scalar"] = hidden // heads if big else config["head_dim"]


def _phi3(
    path: Path,
    config: dict[str, Any],
    meta: dict[str, Any],
    get: Any,
    factors: dict[str, np.ndarray],
    rope_dims: int,
) -> None:
    """Phi-3's keys and longrope factor tensors. Ollama's converter writes a 0 where the HF
    config has no value (window, original context) and empty factor tensors where it has no
    RoPE scaling: each means "none"."""

    def optional(key: str) -> Any:
        return get(key) if meta.get(f"phi3.{key}") not in (None, 0) else None

    window = optional("attention.sliding_window")
    if window is not None:
        config["sliding_window"] = window
    original = optional("rope.scaling.original_context_length")
    config["original_max_position_embeddings"] = original or config["max_position_embeddings"]
    long, short = factors.get("rope_factors_long.weight"), factors.get("rope_factors_short.weight")
    if long is None or long.size == 0:
        return
    n = rope_dims // 2
    for name, f in (("long", long), ("short", short if short is not None else long)):
        if f.shape != (n,) or not np.all(np.isfinite(f) & (f > 0)):
            raise ModelLoadError(
                f"{path}: tensor 'rope_factors_{name}.weight' must hold {n} positive factors"
            )
    config["rope_scaling"] = {
        "type": "longrope",
        "long_factor": [float(x) for x in long],
        "short_factor": [float(x) for x in (short if short is not None else long)],
    }


def _llama3_scaling(path: Path, factors: np.ndarray, base: float, dims: int) -> dict[str, Any]:
    """HF's llama3 ``rope_scaling`` from llama.cpp's per-frequency divisors (``rope_freqs``).

    Each divisor is 1 (short wavelengths), ``factor`` (long ones) or ``1 / ((1 - s) / factor
    + s)`` with ``s = old_ctx / (wavelen * (high - low)) - low / (high - low)`` in between: a
    line in ``1 / wavelen`` whose two coefficients fix the boundaries. Taking
    ``low_freq_factor = 1`` picks the one parameter set the divisors cannot tell apart.
    """
    n = (dims + 1) // 2  # checked before ``dims`` (metadata) sizes an array
    f = factors.astype(np.float64)
    if f.shape != (n,) or not np.all(np.isfinite(f) & (f > 0)):
        raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' must hold {n} positive factors")
    wavelens = 2 * np.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    factor = float(f.max())
    if factor <= 1 + 1e-6:
        return {"type": "default"}
    medium = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if medium.sum() >= 2:
        s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelens[medium], s, 1)
        with np.errstate(all="ignore"):
            high, old_ctx = round(float((b - 1) / b), 4), round(float(-a / b), 2)
    else:  # a step: put both boundaries between the last unscaled and first scaled wavelength
        first = int(np.argmax(f > 1 + 1e-4))
        inner = wavelens[first - 1] if first else wavelens[0] / 2
        old_ctx = float(wavelens[first]) * 0.999
        high = old_ctx / (float(inner) * 1.001)
    not_llama3 = ModelLoadError(f"{path}: tensor 'rope_freqs.weight' is not llama3 RoPE scaling")
    if not (np.isfinite(high) and np.isfinite(old_ctx) and high > 1 and old_ctx > 0):
        raise not_llama3
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(old_ctx) if old_ctx == int(old_ctx) else old_ctx,
    }
    smooth = np.clip((old_ctx / wavelens - 1) / (high - 1), 0, 1)
    if not np.allclose(1 / ((1 - smooth) / factor + smooth), f, rtol=1e-3):
        raise not_llama3
    return scaling


def _short_float(value: Any) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the float32's shortest repr.
    with np.errstate(over="ignore"):  # a float64 past float32's range becomes inf
        return float(str(np.float32(value)))
