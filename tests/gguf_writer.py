"""A tiny GGUF (v3) writer for tests: metadata, tensor infos, aligned data, and the block
encodings F32, F16, Q8_0, Q4_0 and Q4_1, with numpy decoders to check what a reader returns.

Also the reverse of what ``runtime.formats.gguf`` undoes: HF -> GGUF tensor names and llama.cpp's
row order for the q/k projections.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ALIGNMENT = 32
QK = 32  # values per quantized block

GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8}
GGML_TYPES |= {"Q4_K": 12, "Q5_K": 13}
GGML_TYPES |= {"Q6_K": 14, "Q2_K": 10, "BF16": 30}
QK_K = 256  # values per K-quant super-block
_Q4_K = [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]
_Q5_K = [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]
_Q6_K = [("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]

# GGUF metadata value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)


class U32(int):
    """Metadata that must be written as uint32 (ints default to uint32 anyway; this is explicit)."""


class I32(int):
    """Metadata written as int32."""


class U64(int):
    """Metadata written as uint64."""


class F32Value(float):
    """Metadata written as float32 (floats default to float32)."""


class F64Value(float):
    """Metadata written as float64."""


class Raw:
    """Metadata written as given: a value type and the bytes after it (to make broken files)."""

    def __init__(self, value_type: int, body: bytes) -> None:
        self.value_type = value_type
        self.body = body


def _string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _scalar(value: Any) -> tuple[int, bytes]:
    if isinstance(value, bool):
        return _BOOL, struct.pack("<?", value)
    if isinstance(value, I32):
        return _I32, struct.pack("<i", value)
    if isinstance(value, U64):
        return _U64, struct.pack("<Q", value)
    if isinstance(value, int):
        return (_U32, struct.pack("<I", value)) if value >= 0 else (_I32, struct.pack("<i", value))
    if isinstance(value, F64Value):
        return _F64, struct.pack("<d", value)
    if isinstance(value, float):
        return _F32, struct.pack("<f", value)
    if isinstance(value, str):
        return _STR, _string(value)
    raise TypeError(f"unsupported metadata value {value!r}")


def _value(value: Any) -> tuple[int, bytes]:
    if isinstance(value, Raw):
        return value.value_type, value.body
    if isinstance(value, np.ndarray):
        kinds = {np.dtype(np.int32): (_I32, "<i4"), np.dtype(np.float32): (_F32, "<f4")}
        kind, fmt = kinds[value.dtype]
        return _ARR, struct.pack("<IQ", kind, len(value)) + value.astype(fmt).tobytes()
    if isinstance(value, list | tuple):
        items = [_scalar(v) for v in value]
        kind = items[0][0] if items else _STR
        body = b"".join(b for _, b in items)
        return _ARR, struct.pack("<IQ", kind, len(items)) + body
    return _scalar(value)


# ---- block encodings (llama.cpp's reference quantizers) ----


def _blocks(x: np.ndarray) -> np.ndarray:
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if flat.size % QK:
        raise ValueError("quantized tensors need a multiple of 32 values per row")
    return flat.reshape(-1, QK)


def _nibbles(q: np.ndarray) -> np.ndarray:
    # Byte j of a block holds value j in its low nibble and value j + 16 in its high nibble.
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _encode_q5(b: np.ndarray, kind: str) -> bytes:
    """Q5_0 (symmetric, d = signed max / -16) or Q5_1 (min + d * q); fifth bits in ``qh``."""
    n = len(b)
    if kind == "Q5_0":
        idx = np.abs(b).argmax(axis=1)
        d = b[np.arange(n), idx] / -16
        lo = np.zeros(n, np.float32)
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        q = np.minimum(31, np.trunc(b * inv[:, None] + 16.5))
    else:
        lo, hi = b.min(axis=1), b.max(axis=1)
        d = (hi - lo) / 31
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        q = np.trunc((b - lo[:, None]) * inv[:, None] + 0.5)
    q = q.astype(np.uint32)
    qh = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=1).astype(np.uint32)
    fields = [("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("q", "u1", 16)]
    out = np.zeros(n, dtype=fields if kind == "Q5_1" else [fields[0], *fields[2:]])
    out["d"], out["qh"], out["q"] = d, qh, _nibbles(q & 0xF)
    if kind == "Q5_1":
        out["m"] = lo
    return out.tobytes()


def encode(x: np.ndarray, kind: str) -> bytes:
    """The bytes of tensor ``x`` (row-major) as GGML type ``kind``."""
    if kind == "F32":
        return np.asarray(x, np.float32).tobytes()
    if kind == "F16":
        return np.asarray(x, np.float16).tobytes()
    if kind == "BF16":  # the upper half of each float32, rounded to nearest even
        bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        return _random_k_blocks(np.asarray(x), kind)
    if kind == "Q2_K":  # only its size is right: enough to make a file a reader must refuse
        return bytes(84 * (np.asarray(x).size // QK_K))
    b = _blocks(x)
    n = len(b)
    if kind in ("Q5_0", "Q5_1"):
        return _encode_q5(b, kind)
    if kind == "Q8_0":
        amax = np.abs(b).max(axis=1)
        d = amax / 127
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        q = np.round(b * inv[:, None]).astype(np.int8)
        out = np.zeros(n, dtype=[("d", "<f2"), ("q", "i1", 32)])
        out["d"], out["q"] = d, q
        return out.tobytes()
    if kind == "Q4_0":
        idx = np.abs(b).argmax(axis=1)
        signed_max = b[np.arange(n), idx]
        d = signed_max / -8
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        q = np.clip(np.trunc(b * inv[:, None] + 8.5), 0, 15)
        out = np.zeros(n, dtype=[("d", "<f2"), ("q", "u1", 16)])
        out["d"], out["q"] = d, _nibbles(q)
        return out.tobytes()
    if kind == "Q4_1":
        lo, hi = b.min(axis=1), b.max(axis=1)
        d = (hi - lo) / 15
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        q = np.clip(np.trunc((b - lo[:, None]) * inv[:, None] + 0.5), 0, 15)
        out = np.zeros(n, dtype=[("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)])
        out["d"], out["m"], out["q"] = d, lo, _nibbles(q)
        return out.tobytes()
    raise ValueError(f"no encoder for {kind}")


def _random_k_blocks(x: np.ndarray, kind: str) -> bytes:
    """Valid K-quant blocks with random contents, seeded by ``x``.

    There is no K-quant quantizer here: the values do not approximate ``x``. ``decode`` gives
    what they hold, which is what a reader must reproduce.
    """
    if x.size % QK_K:
        raise ValueError("K-quant tensors need a multiple of 256 values per row")
    rng = np.random.default_rng(int(np.abs(x).sum() * 1e6) % 2**32)
    n = x.size // QK_K
    out = np.zeros(n, dtype={"Q4_K": _Q4_K, "Q5_K": _Q5_K, "Q6_K": _Q6_K}[kind])
    for name in out.dtype.names or ():
        field = out[name]
        if name in ("d", "dmin"):
            out[name] = rng.uniform(0.002, 0.02, size=n)
        elif field.dtype == np.int8:
            out[name] = rng.integers(-128, 128, size=field.shape)
        else:
            out[name] = rng.integers(0, 256, size=field.shape)
    return out.tobytes()


def _decode_q4_k(data: bytes, *, five: bool = False) -> np.ndarray:
    blk = np.frombuffer(data, dtype=_Q5_K if five else _Q4_K)
    sc = blk["scales"].astype(np.int32)
    # Eight 6-bit (scale, min) pairs per block: 0-3 in the low bits of bytes 0-7, 4-7 split.
    scale = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)], 1)
    mins = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], 1)
    d = blk["d"].astype(np.float32)[:, None] * scale.astype(np.float32)
    m = blk["dmin"].astype(np.float32)[:, None] * mins.astype(np.float32)
    qs = blk["qs"].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: low nibbles, then high nibbles
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    if five:  # bit s of qh[l] adds 16 to value l of sub-block s
        for s in range(8):
            q[:, s] += 16 * ((blk["qh"] >> s) & 1)
    return (d[:, :, None] * q - m[:, :, None]).reshape(-1)


def _decode_q6_k(data: bytes) -> np.ndarray:
    blk = np.frombuffer(data, dtype=_Q6_K)
    out = np.zeros((len(blk), 2, 4, 32), dtype=np.float32)
    for half in range(2):
        ql = blk["ql"][:, 64 * half : 64 * half + 64].astype(np.int32)
        qh = blk["qh"][:, 32 * half : 32 * half + 32].astype(np.int32)
        sc = blk["scales"][:, 8 * half : 8 * half + 8].astype(np.float32)
        quads = [
            (ql[:, :32] & 0xF) | ((qh & 3) << 4),
            (ql[:, 32:] & 0xF) | (((qh >> 2) & 3) << 4),
            (ql[:, :32] >> 4) | (((qh >> 4) & 3) << 4),
            (ql[:, 32:] >> 4) | (((qh >> 6) & 3) << 4),
        ]
        for k, q in enumerate(quads):
            # Values 0-15 of each 32 use scale 2k, values 16-31 scale 2k + 1.
            scale = np.repeat(sc[:, [2 * k, 2 * k + 1]], 16, axis=1)
            out[:, half, k] = scale * (q - 32).astype(np.float32)
    return (blk["d"].astype(np.float32)[:, None] * out.reshape(len(blk), -1)).reshape(-1)


def decode(data: bytes, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """What ``encode`` stored, back as float32 (the value a GGML reader must reproduce)."""
    if kind == "F32":
        return np.frombuffer(data, np.float32).reshape(shape).copy()
    if kind == "F16":
        return np.frombuffer(data, np.float16).astype(np.float32).reshape(shape)
    if kind == "BF16":
        wide = np.frombuffer(data, "<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    if kind == "Q4_K":
        return _decode_q4_k(data).reshape(shape)
    if kind == "Q5_K":
        return _decode_q4_k(data, five=True).reshape(shape)
    if kind == "Q6_K":
        return _decode_q6_k(data).reshape(shape)
    if kind in ("Q5_0", "Q5_1"):
        fields = [("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("q", "u1", 16)]
        blk = np.frombuffer(data, dtype=fields if kind == "Q5_1" else [fields[0], *fields[2:]])
        low = np.concatenate([blk["q"] & 0xF, blk["q"] >> 4], axis=1).astype(np.uint32)
        q = (low | (((blk["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4)).astype(
            np.float32
        )
        d = blk["d"].astype(np.float32)[:, None]
        vals = d * q + blk["m"].astype(np.float32)[:, None] if kind == "Q5_1" else d * (q - 16)
        return vals.reshape(shape)
    if kind == "Q8_0":
        blk = np.frombuffer(data, dtype=[("d", "<f2"), ("q", "i1", 32)])
        vals = blk["d"].astype(np.float32)[:, None] * blk["q"].astype(np.float32)
    elif kind in ("Q4_0", "Q4_1"):
        fields = [("d", "<f2"), ("q", "u1", 16)]
        if kind == "Q4_1":
            fields.insert(1, ("m", "<f2"))
        blk = np.frombuffer(data, dtype=fields)
        q = np.concatenate([blk["q"] & 0xF, blk["q"] >> 4], axis=1).astype(np.float32)
        d = blk["d"].astype(np.float32)[:, None]
        vals = d * q + blk["m"].astype(np.float32)[:, None] if kind == "Q4_1" else d * (q - 8)
    else:
        raise ValueError(f"no decoder for {kind}")
    return vals.reshape(shape)


# ---- HF naming and llama.cpp's q/k row order ----

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_NAMES_BY_ARCH = {
    "gemma3": _LAYER_NAMES
    | {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
    "phi3": _LAYER_NAMES | {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
}
GGUF_ARCH = {"gemma3_text": "gemma3"}  # HF model_type -> llama.cpp architecture, where they differ


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    module, suffix = hf_name.rsplit(".", 1)
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{suffix}"
    names = _LAYER_NAMES_BY_ARCH.get(arch, _LAYER_NAMES)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m is None or m.group(2) not in names:
        raise KeyError(hf_name)
    return f"blk.{m.group(1)}.{names[m.group(2)]}.{suffix}"


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k: within each head, the two rotary halves interleaved."""
    head = w.shape[0] // n_head
    return w.reshape(n_head, 2, head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).copy()


# ---- the file ----


def write_gguf(
    path: Path,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, tuple[np.ndarray, str]],
    *,
    version: int = 3,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    offsets: Mapping[str, int] | None = None,
    type_ids: Mapping[str, int] | None = None,
) -> dict[str, bytes]:
    """Write a GGUF file; ``tensors`` maps name -> (array, GGML type name).

    To make broken files, ``shapes`` overrides the declared (row-major) shape of a tensor,
    ``offsets`` its declared data offset and ``type_ids`` its declared GGML type number (the
    data is written as the array and type name say). Returns the encoded bytes of each tensor.
    """
    kv = b""
    for key, value in metadata.items():
        value_type, body = _value(value)
        kv += _string(key) + struct.pack("<I", value_type) + body
    infos = b""
    blobs: dict[str, bytes] = {}
    offset = 0
    for name, (array, kind) in tensors.items():
        data = encode(array, kind)
        blobs[name] = data
        shape = (shapes or {}).get(name, tuple(array.shape))
        dims = tuple(reversed(shape))  # GGUF lists the innermost dimension first
        declared_offset = (offsets or {}).get(name, offset)
        type_id = (type_ids or {}).get(name, GGML_TYPES[kind])
        infos += _string(name) + struct.pack(
            f"<I{len(dims)}QIQ", len(dims), *dims, type_id, declared_offset
        )
        offset += len(data)
        offset += -offset % ALIGNMENT
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)) + kv + infos
    head += b"\0" * (-len(head) % ALIGNMENT)
    with path.open("wb") as f:
        f.write(head)
        for data in blobs.values():
            f.write(data)
            f.write(b"\0" * (-len(data) % ALIGNMENT))
    return blobs


# ---- tiny models ----

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Numbers like 12345 and 2024 appear here.",
    "Once upon a time, there was a little girl who loved to play in the sun.",
    "The capital of France is Paris; the capital of Italy is Rome.",
]


def train_gpt2_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained in-process; ChatML specials are ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=GPT2_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def gpt2_tokenizer_metadata(*, pre: str = "smollm", vocab_size: int = 320) -> dict[str, Any]:
    """``train_gpt2_tokenizer``'s vocabulary as ``tokenizer.ggml.*`` metadata."""
    model = json.loads(train_gpt2_tokenizer(vocab_size).to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = np.array([3 if t in GPT2_SPECIALS else 1 for t in tokens], dtype=np.int32)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


SPM_PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "▁t", "he", "ll", "▁the", "▁w", "or"]
SPM_PIECES += ["ld", "▁wor", "▁world", "▁he", "llo", "▁hello"]


def spm_tokenizer_metadata() -> dict[str, Any]:
    """A SentencePiece-style vocabulary (llama's ``<unk>``, ``<s>``, ``</s>``, byte pieces)."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [2, 3, 3, *([6] * 256), *([1] * len(SPM_PIECES))]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def model_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """``general.*`` and ``<arch>.*`` metadata for an HF ``config``."""
    arch = GGUF_ARCH.get(config["model_type"], config["model_type"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    extra: dict[str, Any] = {}
    if config.get("sliding_window"):
        extra[f"{arch}.attention.sliding_window"] = config["sliding_window"]
    if arch == "phi3":
        extra[f"{arch}.rope.scaling.original_context_length"] = config[
            "original_max_position_embeddings"
        ]
    if (config.get("rope_scaling") or {}).get("rope_type") == "linear":
        extra[f"{arch}.rope.scaling.type"] = "linear"
        extra[f"{arch}.rope.scaling.factor"] = float(config["rope_scaling"]["factor"])
    return extra | {
        "general.architecture": arch,
        "general.name": f"tiny {arch}",
        "general.file_type": 2,
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": int(head_dim * config.get("partial_rotary_factor", 1.0)),
        f"{arch}.rope.freq_base": float(config["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        f"{arch}.vocab_size": config["vocab_size"],
    }


def mixed_types(hf_name: str) -> str:
    """A mix like llama.cpp's Q4 files: 8-bit embedding, 4-bit layers, float norms."""
    if hf_name.endswith(("norm.weight", ".bias")):
        return "F32"
    if "embed_tokens" in hf_name or "down_proj" in hf_name:
        return "Q8_0"
    if "lm_head" in hf_name:
        return "F16"
    if any(p in hf_name for p in ("q_proj", "k_proj", "gate_proj")):
        return "Q4_0"
    return "Q4_1"


def write_model_gguf(
    path: Path,
    config: dict[str, Any],
    weights: Mapping[str, np.ndarray],
    tokenizer: Mapping[str, Any],
    *,
    types: Any = mixed_types,
    extra_metadata: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    offsets: Mapping[str, int] | None = None,
    type_ids: Mapping[str, int] | None = None,
    extra_tensors: Mapping[str, tuple[np.ndarray, str]] | None = None,
) -> dict[str, bytes]:
    """Write HF-named ``weights`` as llama.cpp would (names, q/k row order, Gemma's norms as
    ``1 + weight``, Phi-3's longrope factors as tensors); GGUF name -> bytes.

    ``types`` maps an HF tensor name to a GGML type name; ``drop`` omits GGUF tensors;
    ``extra_tensors`` are GGUF-named and written as given; ``shapes``, ``offsets`` and
    ``type_ids`` (GGUF names) go to ``write_gguf``.
    """
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    arch = GGUF_ARCH.get(config["model_type"], config["model_type"])
    for hf_name, array in weights.items():
        name = gguf_name(hf_name, arch)
        if name in drop:
            continue
        array = np.asarray(array, dtype=np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        if config["model_type"] == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            array = rope_permute(array, heads)
        tensors[name] = (array, types(hf_name))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") == "longrope":
        for kind in ("long", "short"):
            factors = np.array(scaling[f"{kind}_factor"], dtype=np.float32)
            tensors[f"rope_factors_{kind}.weight"] = (factors, "F32")
    tensors |= extra_tensors or {}
    metadata = {**model_metadata(config), **tokenizer, **(extra_metadata or {})}
    return write_gguf(path, metadata, tensors, shapes=shapes, offsets=offsets, type_ids=type_ids)
