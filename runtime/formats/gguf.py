"""Read GGUF files (llama.cpp's format) into an HF/mlx-lm-shaped model: config, weights, tokenizer.

``read_gguf`` parses and checks the header (``runtime.formats.gguf_file``), derives the config
(``runtime.formats.gguf_config``) and checks the tensor set against the architecture in GGUF's
own names, so a broken file gets an error naming the file and tensor before anything is
decoded; then it decodes each tensor from the file's bytes (``runtime.formats.gguf_blocks``):
block-quantized types become MLX's quantized layout (packed ``uint32`` weight, float32
``scales`` and ``biases``, group 32), the rest dense arrays. The file is hostile input: every
failure, whatever raised it, reaches the caller as a ``ModelLoadError`` naming the file.
Tensors get mlx-lm names, and for llama the q/k projection rows are put back in HF order
(llama.cpp interleaves the two rotary halves of each head; the other architectures use NEOX
RoPE and are stored unpermuted). Gemma 3's norm weights are stored as ``1 + weight`` (llama.cpp
multiplies by them directly); the ``1`` is taken off again. Phi-3 keeps its fused ``attn_qkv``
and ``ffn_up`` (gate and up) as HF has them. ``write_folder``
turns the result into a model folder that ``mlx_lm.load`` accepts. The tokenizer is rebuilt in
``runtime.formats.gguf_tokenizer``. The config carries each quantized module's bits under
``quantization``, where ``runtime.models.checkpoint`` reads them.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from runtime.errors import ModelLoadError
from runtime.formats.gguf_blocks import GROUP_SIZE, to_mlx
from runtime.formats.gguf_config import FACTOR_TENSORS, arch_config
from runtime.formats.gguf_file import TYPES, TensorInfo, nbytes, read_header
from runtime.formats.gguf_tokenizer import build_tokenizer

# What a malformed file can make parsing or decoding raise besides ModelLoadError (numpy and
# MLX report bad shapes as ValueError, MLX its own failures as RuntimeError).
_PARSE_ERRORS = (
    struct.error,
    UnicodeError,
    ValueError,
    ArithmeticError,
    LookupError,
    TypeError,
    RuntimeError,
    MemoryError,
)


@attrs.frozen(kw_only=True)
class GGUFContents:
    """A GGUF file in HF/mlx-lm terms."""

    config: dict[str, Any]  # config.json, with "quantization" when any tensor is quantized
    weights: dict[str, mx.array]  # mlx-lm names; quantized: .weight (uint32) + .scales + .biases
    tokenizer_json: str
    tokenizer_config: dict[str, Any]  # chat_template, bos_token, eos_token, add_bos_token, ...
    metadata: dict[str, Any]  # the file's metadata as plain Python values


# ---- tensors ----

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Where an architecture's layer names differ from llama's.
_LAYER_BY_ARCH = {
    "gemma3": _LAYER
    | {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": _LAYER | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)")


def _hf_module(gguf_module: str, arch: str) -> str | None:
    if gguf_module in _TOP:
        return _TOP[gguf_module]
    m = _LAYER_RE.fullmatch(gguf_module)
    names = _LAYER_BY_ARCH.get(arch, _LAYER)
    if m is None or m.group(2) not in names:
        return None
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}"


def _expected_shapes(config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """GGUF tensor name -> row-major shape, and the names that may be absent."""
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nq, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    arch = _arch(config)
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, d),
        "output_norm.weight": (d,),
        "output.weight": (vocab, d),
    }
    optional = {"output.weight"}
    for i in range(config["num_hidden_layers"]):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (d,),
            b + "ffn_norm.weight": (d,),
            b + "attn_output.weight": (d, nq * hd),
            b + "ffn_down.weight": (d, ff),
        }
        if arch == "phi3":
            shapes[b + "attn_qkv.weight"] = ((nq + 2 * nkv) * hd, d)
            shapes[b + "ffn_up.weight"] = (2 * ff, d)
        else:
            shapes |= {
                b + "attn_q.weight": (nq * hd, d),
                b + "attn_k.weight": (nkv * hd, d),
                b + "attn_v.weight": (nkv * hd, d),
                b + "ffn_gate.weight": (ff, d),
                b + "ffn_up.weight": (ff, d),
            }
        if arch == "qwen2" or config.get("attention_bias"):
            shapes |= {b + "attn_q.bias": (nq * hd,), b + "attn_k.bias": (nkv * hd,)}
            shapes |= {b + "attn_v.bias": (nkv * hd,)}
            if arch == "llama":
                shapes[b + "attn_output.bias"] = (d,)
        if config.get("mlp_bias"):
            shapes |= {
                b + "ffn_gate.bias": (ff,),
                b + "ffn_up.bias": (ff,),
                b + "ffn_down.bias": (d,),
            }
        if arch in ("qwen3", "gemma3"):
            shapes |= {b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)}
        if arch == "gemma3":
            shapes |= {b + "post_attention_norm.weight": (d,), b + "post_ffw_norm.weight": (d,)}
    return shapes, optional


def _arch(config: dict[str, Any]) -> str:
    """The GGUF architecture of a config ``arch_config`` made."""
    return "gemma3" if config["model_type"] == "gemma3_text" else str(config["model_type"])


def _check_tensor_set(path: Path, config: dict[str, Any], infos: dict[str, TensorInfo]) -> None:
    expected, optional = _expected_shapes(config)
    for name, info in infos.items():
        if name not in expected:
            raise ModelLoadError(f"{path}: unexpected tensor {name!r}")
        if info.shape != expected[name]:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has shape {info.shape}, expected {expected[name]}"
            )
    missing = [n for n in expected if n not in infos and n not in optional]
    if missing:
        raise ModelLoadError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing)")


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k row order: per head, rows (pairs, 2) -> (2 halves, pairs)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _load_tensors(
    path: Path, data: mmap.mmap, start: int, config: dict[str, Any], infos: dict[str, TensorInfo]
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """mlx-lm-named arrays and the bits of each quantized module."""
    weights: dict[str, mx.array] = {}
    bits: dict[str, int] = {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    arch = _arch(config)
    for name, info in infos.items():
        module, _, suffix = name.rpartition(".")
        hf = _hf_module(module, arch)
        if hf is None:  # _check_tensor_set admits only known names
            raise ModelLoadError(f"{path}: unexpected tensor {name!r}")
        begin = start + info.offset
        raw = np.frombuffer(data[begin : begin + nbytes(info)], dtype=np.uint8)
        parts = to_mlx(info.kind, raw, info.shape)
        if "scales" in parts:
            if suffix != "weight" or len(info.shape) != 2:
                raise ModelLoadError(f"{path}: tensor {name!r}: only 2-D weights may be quantized")
            bits[hf] = TYPES[info.kind].bits or 0
        n_head = heads.get(module.rpartition(".")[2]) if arch == "llama" else None
        if arch == "gemma3" and name.endswith("norm.weight") and "scales" not in parts:
            parts = {"weight": parts["weight"].astype(mx.float32) - 1.0}
        for part, array in parts.items():
            key = f"{hf}.{suffix if part == 'weight' else part}"
            weights[key] = array if n_head is None else _unpermute(array, n_head)
    return weights, bits


def _quantization(bits: dict[str, int]) -> dict[str, Any]:
    main = Counter(bits.values()).most_common(1)[0][0]
    out: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": main}
    for module, b in sorted(bits.items()):
        if b != main:
            out[module] = {"group_size": GROUP_SIZE, "bits": b}
    return out


def _rope_factors(
    path: Path, infos: list[TensorInfo], data: mmap.mmap, start: int
) -> dict[str, np.ndarray]:
    """The file's ``FACTOR_TENSORS`` by name."""
    out = {}
    for info in infos:
        if info.name not in FACTOR_TENSORS:
            continue
        if info.kind != 0 or len(info.shape) != 1:
            raise ModelLoadError(f"{path}: tensor {info.name!r} must be a 1-D F32 tensor")
        begin = start + info.offset
        out[info.name] = np.frombuffer(data[begin : begin + 4 * info.shape[0]], "<f4").copy()
    return out


_VISION_PREFIXES = ("v.", "mm.")
_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _text_vocabulary(metadata: dict[str, Any], rows: int) -> dict[str, Any]:
    """The tokenizer arrays cut to the embedding's rows: Ollama's Gemma 3 files list image
    tokens past the text model's vocabulary."""
    out = dict(metadata)
    for key in _VOCAB_ARRAYS:
        value = out.get(key)
        if isinstance(value, list) and len(value) > rows:
            out[key] = value[:rows]
    return out


def read_gguf(path: Path) -> GGUFContents:
    """Read a GGUF file of a ``SUPPORTED_ARCHITECTURES`` model; every failure is a
    ``ModelLoadError`` naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise ModelLoadError(f"{path}: empty file, not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _read(path, data)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from exc
    except _PARSE_ERRORS as exc:  # a check this module lacks: still the file's fault
        raise ModelLoadError(f"{path}: corrupt GGUF file ({type(exc).__name__}: {exc})") from exc


def _read(path: Path, data: mmap.mmap) -> GGUFContents:
    metadata, info_list, start = read_header(path, data)
    splits = metadata.get("split.count", 1)
    if isinstance(splits, int) and splits > 1:
        raise ModelLoadError(
            f"{path}: part of a GGUF split into {splits} files; merge them first "
            "(llama-gguf-split --merge)"
        )
    infos = {i.name: i for i in info_list if i.name not in FACTOR_TENSORS}  # names are unique
    text_only = metadata.get("general.architecture") == "gemma3"
    if text_only:  # Ollama's Gemma 3 files carry the vision model too: only its text is run
        infos = {k: v for k, v in infos.items() if not k.startswith(_VISION_PREFIXES)}
    rope_factors = _rope_factors(path, info_list, data, start)
    config = arch_config(path, metadata, infos, rope_factors)
    _check_tensor_set(path, config, infos)
    vocab_meta = _text_vocabulary(metadata, config["vocab_size"]) if text_only else metadata
    tokenizer_json, tokenizer_config, special = build_tokenizer(
        path, vocab_meta, config["vocab_size"]
    )
    config |= special
    weights, bits = _load_tensors(path, data, start, config, infos)
    if bits:
        config["quantization"] = _quantization(bits)
    return GGUFContents(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        metadata=metadata,
    )


def write_folder(
    contents: GGUFContents, out_dir: Path, *, dequantize: bool = False, dtype: mx.Dtype = mx.float32
) -> Path:
    """Write an HF/MLX model folder (``mlx_lm.load`` reads it); floats, scales and biases in ``dtype``."""
    out_dir = Path(out_dir)
    config = dict(contents.config)
    quant = config.pop("quantization", None)
    weights: dict[str, mx.array] = {}
    for name, array in contents.weights.items():
        module, _, part = name.rpartition(".")
        if part in ("scales", "biases"):
            if not dequantize:
                weights[name] = array.astype(dtype)
            continue
        if f"{module}.scales" in contents.weights and part == "weight":
            if dequantize:
                array = mx.dequantize(
                    array,
                    contents.weights[f"{module}.scales"].astype(mx.float32),
                    contents.weights[f"{module}.biases"].astype(mx.float32),
                    group_size=GROUP_SIZE,
                    bits=_module_bits(quant, module),
                ).astype(dtype)
            weights[name] = array
        else:
            weights[name] = array.astype(dtype)
    if quant is not None and not dequantize:
        config["quantization"] = quant
    config["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32")
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "tokenizer.json").write_text(contents.tokenizer_json, encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(contents.tokenizer_config, indent=2), encoding="utf-8"
    )
    return out_dir


def _module_bits(quant: dict[str, Any] | None, module: str) -> int:
    assert quant is not None
    override = quant.get(module)
    return int(override["bits"]) if isinstance(override, dict) else int(quant["bits"])
