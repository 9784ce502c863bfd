"""GGUF reading: config, dequantized weights, q/k row order, tokenizer, and broken files.

Tiny GGUF files are written in-process by ``tests.gguf_writer`` from random HF-named weights;
the reference for the model is mlx-lm loading ``write_folder`` of the same file (or the
original HF weights, for F32 files).
"""

from __future__ import annotations

import importlib
import io
import json
import mmap
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from runtime.errors import ModelLoadError
from runtime.formats.gguf import GGUFContents, read_gguf, write_folder
from runtime.formats.gguf_file import read_header
from runtime.formats.model_files import POOLING_KEY
from runtime.models.loader import load_model
from runtime.testing.models import random_weights, tiny_config
from tests import gguf_writer as gw

GPT2_TOKENS = gw.gpt2_tokenizer_metadata()
VOCAB = len(GPT2_TOKENS["tokenizer.ggml.tokens"])


def _model(
    arch: str, *, seed: int = 0, **overrides: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = tiny_config(arch, vocab_size=VOCAB, **overrides)
    weights = {k: np.array(v) for k, v in random_weights(config, seed=seed).items()}
    return config, weights


def _gguf(tmp_path: Path, arch: str = "llama", name: str = "m.gguf", **kwargs: Any) -> Path:
    config, weights = _model(arch)
    tokenizer = kwargs.pop("tokenizer", GPT2_TOKENS)
    path = tmp_path / name
    gw.write_model_gguf(path, config, weights, tokenizer, **kwargs)
    return path


def _ours(path: Path, execution: Literal["dense", "quantized"] = "quantized") -> Any:
    return load_model(path, execution=execution).model


def _mlx_lm(folder: Path) -> Any:
    import mlx_lm

    return mlx_lm.load(str(folder))[0]


def _ids(n: int = 11, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, size=(1, n)), dtype=mx.int32)


def _diff(a: mx.array, b: mx.array) -> float:
    return float(np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32)).max())


# ---- config and metadata ----


def test_config_from_metadata(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    config = contents.config
    expected = tiny_config("llama", vocab_size=VOCAB)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        assert config[key] == expected[key]
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16
    assert config["rms_norm_eps"] == 1e-5  # float32 in the file, shortest repr here
    assert config["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == 256
    assert config["vocab_size"] == VOCAB
    assert config["tie_word_embeddings"] is True
    # 4-bit layers dominate; the 8-bit embedding and down projections are listed per module.
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 4)
    assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quant["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    assert "model.layers.0.self_attn.q_proj" not in quant
    assert contents.metadata["general.name"] == "tiny llama"
    assert contents.metadata["general.file_type"] == 2


def test_untied_output_and_dense_file_have_no_quantization(tmp_path: Path) -> None:
    config, weights = _model("qwen2")
    path = tmp_path / "q.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    contents = read_gguf(path)
    assert contents.config["tie_word_embeddings"] is False
    assert "quantization" not in contents.config
    assert "lm_head.weight" in contents.weights
    assert "model.layers.0.self_attn.q_proj.bias" in contents.weights


# ---- weights ----


def _hf_order(gguf_rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k rows back in HF order, via the writer's permutation of row indices."""
    order = gw.rope_permute(np.arange(gguf_rows.shape[0])[:, None], n_head).ravel()
    return gguf_rows[np.argsort(order)]


def test_writer_permutation_is_mlx_lm_permute_weights() -> None:
    from mlx_lm.gguf import permute_weights

    w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    assert np.array_equal(gw.rope_permute(w, 4), np.array(permute_weights(mx.array(w), 4)))


BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
# The sizes K-quants need (rows of 256 values).
WIDE = {"hidden_size": 256, "intermediate_size": 512}


def k_quant_types(hf_name: str) -> str:
    """Like a Q4_K_M file: Q4_K, Q6_K and Q5_K layers, legacy Q5 types, BF16 norms."""
    if hf_name.endswith("norm.weight"):
        return "BF16"
    if hf_name.endswith(".bias"):
        return "F32"
    for part, kind in [("v_proj", "Q6_K"), ("down_proj", "Q5_K"), ("embed", "Q6_K")]:
        if part in hf_name:
            return kind
    if "o_proj" in hf_name:
        return "Q5_0"
    return "Q5_1" if "up_proj" in hf_name else "Q4_K"


def _check_weights(
    contents: GGUFContents,
    config: dict[str, Any],
    types: Any,
    blobs: Any,
    weights: dict[str, np.ndarray],
) -> None:
    quant = contents.config.get("quantization", {})
    for hf_name, original in weights.items():
        module, _, part = hf_name.rpartition(".")
        kind = types(hf_name)
        stored = gw.decode(blobs[gw.gguf_name(hf_name)], kind, original.shape)
        gguf_module = gw.gguf_name(hf_name).split(".")[-2]
        if config["model_type"] == "llama" and gguf_module in ("attn_q", "attn_k"):
            heads = config[
                "num_attention_heads" if gguf_module == "attn_q" else "num_key_value_heads"
            ]
            stored = _hf_order(stored, heads)
        if kind in BITS:
            bits = quant.get(module, quant)["bits"]
            assert bits == BITS[kind], hf_name
            assert contents.weights[f"{module}.scales"].dtype == mx.float32
            got = mx.dequantize(
                contents.weights[hf_name],
                contents.weights[f"{module}.scales"],
                contents.weights[f"{module}.biases"],
                group_size=32,
                bits=bits,
            )
        else:
            assert part != "weight" or f"{module}.scales" not in contents.weights, hf_name
            got = contents.weights[hf_name].astype(mx.float32)
        assert np.array_equal(np.array(got), stored), hf_name
        if not kind.endswith("_K"):  # the test's K-quant blocks are random, not a quantization
            # Within quantization error of the original, in the original (HF) row order.
            step = np.abs(original).max() / {8: 127, 5: 15}.get(BITS.get(kind, 8), 7)
            assert np.abs(np.array(got) - original).max() <= step, hf_name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dequantized_weights_equal_the_encoded_blocks(tmp_path: Path, arch: str) -> None:
    config, weights = _model(arch)
    path = tmp_path / "m.gguf"
    blobs = gw.write_model_gguf(path, config, weights, GPT2_TOKENS)
    _check_weights(read_gguf(path), config, gw.mixed_types, blobs, weights)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_k_quant_and_q5_weights_equal_the_encoded_blocks(tmp_path: Path, arch: str) -> None:
    config, weights = _model(arch, **WIDE)
    path = tmp_path / "m.gguf"
    blobs = gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=k_quant_types)
    contents = read_gguf(path)
    _check_weights(contents, config, k_quant_types, blobs, weights)
    assert contents.weights["model.norm.weight"].dtype == mx.bfloat16
    quant = contents.config["quantization"]
    assert (quant["bits"], quant["model.layers.0.mlp.down_proj"]["bits"]) == (4, 5)


def test_k_quant_gguf_logits_equal_mlx_lm_on_write_folder(tmp_path: Path) -> None:
    config, weights = _model("llama", **WIDE)
    path = tmp_path / "m.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=k_quant_types)
    contents = read_gguf(path)
    ref = _mlx_lm(write_folder(contents, tmp_path / "folder"))
    x = _ids(seed=3)
    assert _diff(_ours(path, "quantized")(x), ref(x)) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_logits_equal_the_original_checkpoint(tmp_path: Path, arch: str) -> None:
    """Un-permuted q/k with standard RoPE reproduce the HF weights' model exactly."""
    config, weights = _model(arch)
    path = tmp_path / "m.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=lambda _: "F32")
    ours = _ours(path, execution="dense")
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    ref = module.Model(module.ModelArgs.from_dict(config))
    ref.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    x = _ids()
    assert _diff(ours(x), ref(x)) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("execution", ["quantized", "dense"])
def test_quantized_gguf_logits_equal_mlx_lm_on_write_folder(
    tmp_path: Path, arch: str, execution: Literal["dense", "quantized"]
) -> None:
    path = _gguf(tmp_path, arch)
    ref = _mlx_lm(write_folder(read_gguf(path), tmp_path / "folder"))
    x = _ids(seed=1)
    assert _diff(_ours(path, execution)(x), ref(x)) <= 1e-4


def _llama3_divisors(dims: int, base: float, scaling: dict[str, Any]) -> np.ndarray:
    """What llama.cpp's converter stores in ``rope_freqs.weight`` for HF llama3 scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * np.pi * base ** (i / dims)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_llama3_rope_factors_become_rope_scaling(tmp_path: Path) -> None:
    config, weights = _model("llama", tie_word_embeddings=False)
    path = tmp_path / "m.gguf"
    divisors = _llama3_divisors(16, 10000.0, LLAMA3)
    extra = {"rope_freqs.weight": (divisors, "F32")}
    gw.write_model_gguf(
        path, config, weights, GPT2_TOKENS, types=lambda _: "F32", extra_tensors=extra
    )
    contents = read_gguf(path)
    assert contents.config["rope_scaling"] == LLAMA3
    assert "rope_freqs.weight" not in contents.weights
    ref = importlib.import_module("mlx_lm.models.llama")
    model = ref.Model(ref.ModelArgs.from_dict({**config, "rope_scaling": LLAMA3}))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    x = _ids(40)
    assert _diff(_ours(path, "dense")(x), model(x)) <= 1e-4


def test_stepped_rope_factors_are_reproduced(tmp_path: Path) -> None:
    """Divisors with no smooth band still give a scaling that reproduces them."""
    config, weights = _model("llama")
    path = tmp_path / "m.gguf"
    divisors = np.array([1, 1, 1, 1, 1, 4, 4, 4], dtype=np.float32)
    extra = {"rope_freqs.weight": (divisors, "F32")}
    gw.write_model_gguf(
        path, config, weights, GPT2_TOKENS, types=lambda _: "F32", extra_tensors=extra
    )
    scaling = read_gguf(path).config["rope_scaling"]
    assert np.allclose(_llama3_divisors(16, 10000.0, scaling), divisors, rtol=1e-3)


@pytest.mark.parametrize(
    "divisors",
    [[1, 2, 1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1, 1, 0, 4], [1] * 5, [1, 1, 2, 3, 2, 9, 9, 9]],
)
def test_rope_factors_that_are_not_llama3_are_refused(
    tmp_path: Path, divisors: list[float]
) -> None:
    config, weights = _model("llama")
    path = tmp_path / "m.gguf"
    extra = {"rope_freqs.weight": (np.array(divisors, dtype=np.float32), "F32")}
    gw.write_model_gguf(
        path, config, weights, GPT2_TOKENS, types=lambda _: "F32", extra_tensors=extra
    )
    _raises(path, "'rope_freqs.weight'")


def test_write_folder_dequantized_matches_quantized(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    dense_dir = write_folder(contents, tmp_path / "dense", dequantize=True)
    config = json.loads((dense_dir / "config.json").read_text())
    assert "quantization" not in config
    x = _ids(seed=2)
    quantized = _mlx_lm(write_folder(contents, tmp_path / "q"))(x)
    assert _diff(_mlx_lm(dense_dir)(x), quantized) <= 1e-4
    saved = mx.load(str(dense_dir / "model.safetensors"))
    assert isinstance(saved, dict)
    assert all(v.dtype == mx.float32 for v in saved.values())
    assert not any(k.endswith((".scales", ".biases")) for k in saved)


def test_write_folder_casts_scales_and_floats(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    folder = write_folder(contents, tmp_path / "f16", dtype=mx.float16)
    saved = mx.load(str(folder / "model.safetensors"))
    assert isinstance(saved, dict)
    assert saved["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert saved["model.norm.weight"].dtype == mx.float16
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4


# ---- tokenizer ----


def _tokenizer(contents: GGUFContents) -> Tokenizer:
    return Tokenizer.from_str(contents.tokenizer_json)


def test_gpt2_tokenizer_round_trips_and_splits_digits(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    tok = _tokenizer(contents)
    for text in ["The quick brown fox jumps.", "  spaces\tand\nnewlines ", "héllo wörld ✓ 2024"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tok.encode(" fox").tokens[0].startswith("Ġ")
    # Control tokens are single special ids, not split by the BPE.
    encoded = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert encoded.ids[0] == 1
    assert encoded.ids[-1] == 2
    assert tok.decode(encoded.ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_matches_the_trained_original(tmp_path: Path) -> None:
    """The rebuilt BPE (GPT-2 pre-tokenizer) gives the trained tokenizer's ids."""
    contents = read_gguf(_gguf(tmp_path, tokenizer=gw.gpt2_tokenizer_metadata(pre="default")))
    tok, original = _tokenizer(contents), gw.train_gpt2_tokenizer()
    for text in [
        "The capital of France is Paris.",
        "Once upon a time,  there was a little girl who loved 2024's sun!\n\n",
        "<|im_start|>user\nhéllo ✓<|im_end|>",
    ]:
        ids = tok.encode(text).ids
        assert ids == original.encode(text).ids, text
        assert len(ids) < len(text.encode())  # merges were applied
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_chat_template_and_special_ids_are_carried(tmp_path: Path) -> None:
    contents = read_gguf(_gguf(tmp_path))
    cfg = contents.tokenizer_config
    assert cfg["chat_template"] == gw.CHATML
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert cfg["add_bos_token"] is False
    assert contents.config["bos_token_id"] == 1
    assert contents.config["eos_token_id"] == 2
    assert _tokenizer(contents).encode("hi").ids[0] != 1  # no BOS added


def test_end_of_turn_token_joins_the_eos_ids(tmp_path: Path) -> None:
    tokenizer = {**GPT2_TOKENS, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2}
    contents = read_gguf(_gguf(tmp_path, tokenizer=tokenizer))
    assert contents.config["eos_token_id"] == [0, 2]
    assert contents.tokenizer_config["eos_token"] == "<|endoftext|>"


def test_add_bos_writes_a_bos_post_processor(tmp_path: Path) -> None:
    tokenizer = {**GPT2_TOKENS, "tokenizer.ggml.add_bos_token": True}
    contents = read_gguf(_gguf(tmp_path, tokenizer=tokenizer))
    tok = _tokenizer(contents)
    assert contents.tokenizer_config["add_bos_token"] is True
    assert tok.encode("hi").ids[0] == 1
    assert tok.encode("hi", add_special_tokens=False).ids[0] != 1


@pytest.mark.parametrize(
    ("pre", "text", "expected"),
    [
        ("qwen2", "abc 123", ["abc", "Ġ", "1", "2", "3"]),
        ("llama-bpe", "abc 12345", ["abc", "Ġ", "123", "45"]),
        ("default", "abc 12345", ["abc", "Ġ12345"]),
        ("smollm", "abc 12345", ["abc", "Ġ", "1", "2", "3", "4", "5"]),
        ("gpt-4o", "HelloWorld's 12345", ["Hello", "World's", "Ġ", "123", "45"]),
    ],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(
    tmp_path: Path, pre: str, text: str, expected: list[str]
) -> None:
    contents = read_gguf(_gguf(tmp_path, tokenizer={**GPT2_TOKENS, "tokenizer.ggml.pre": pre}))
    tok = _tokenizer(contents)
    assert tok.pre_tokenizer is not None
    assert [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == expected


def test_sentencepiece_tokenizer_merges_by_score_with_byte_fallback(tmp_path: Path) -> None:
    config, weights = _model("llama")
    spm = gw.spm_tokenizer_metadata()
    n = len(spm["tokenizer.ggml.tokens"])
    config["vocab_size"] = n
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:n]
    path = tmp_path / "spm.gguf"
    gw.write_model_gguf(path, config, weights, spm)
    contents = read_gguf(path)
    tok = _tokenizer(contents)
    encoded = tok.encode("hello world")
    assert encoded.tokens == ["<s>", "▁hello", "▁world"]  # add_bos_token is on
    # "é" is not a piece: its UTF-8 bytes are.
    assert tok.encode("the é", add_special_tokens=False).tokens == [
        "▁the",
        "▁",
        "<0xC3>",
        "<0xA9>",
    ]
    for text in ["hello world", "the é", "wörld  hello"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    assert contents.tokenizer_config["unk_token"] == "<unk>"
    assert contents.tokenizer_config["add_bos_token"] is True


def _sentencepiece_bpe() -> Any:
    """A SentencePiece BPE model trained in-process with llama's settings (byte fallback, no
    normalization, a dummy space prefix)."""
    import sentencepiece as spm

    corpus = [*gw._CORPUS * 20, "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich."]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_sentencepiece_rebuild_encodes_like_sentencepiece(tmp_path: Path) -> None:
    sp = _sentencepiece_bpe()
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        return 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": np.array([sp.get_score(i) for i in range(n)], np.float32),
        "tokenizer.ggml.token_type": np.array([kind(i) for i in range(n)], np.int32),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    config, weights = _model("llama")
    config["vocab_size"] = n
    weights["model.embed_tokens.weight"] = np.resize(weights["model.embed_tokens.weight"], (n, 64))
    path = tmp_path / "spm.gguf"
    gw.write_model_gguf(path, config, weights, meta)
    tok = _tokenizer(read_gguf(path))
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Once upon a time,  there was   a little girl.",
        " leading space and trailing ",
        "lines\nand\ttabs",
        "Zwölf Boxkämpfer, naïve café ✓ 東京 🙂",
        "capital capitals capitalize 12345",
    ]
    for text in texts:
        expected = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == expected, text
        assert tok.decode(expected) == sp.decode(expected), text


# ---- broken files ----


def _raises(path: Path, *needles: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        read_gguf(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    return message


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b'{"not": "gguf"}' * 10)
    _raises(path, "not a GGUF")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises(empty, "empty")
    _raises(tmp_path / "absent.gguf", "cannot read")


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    gw.write_gguf(path, {"general.architecture": "llama"}, {}, version=1)
    _raises(path, "version 1")


@pytest.mark.parametrize("keep", [10, 200, 3000])
def test_truncated_header(tmp_path: Path, keep: int) -> None:
    full = _gguf(tmp_path)
    path = tmp_path / "cut.gguf"
    path.write_bytes(full.read_bytes()[:keep])
    _raises(path, "truncated")


def test_truncated_tensor_data_names_the_tensor(tmp_path: Path) -> None:
    config, weights = _model("llama")
    full = tmp_path / "m.gguf"
    last = list(gw.write_model_gguf(full, config, weights, GPT2_TOKENS))[-1]
    path = tmp_path / "cut.gguf"
    path.write_bytes(full.read_bytes()[:-100])
    _raises(path, "truncated", f"tensor {last!r}")


def test_wrong_tensor_shape_names_the_tensor(tmp_path: Path) -> None:
    # The file is internally consistent; only the shape disagrees with the metadata.
    config, weights = _model("llama")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:96]
    path = tmp_path / "m.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS)
    _raises(path, "'blk.1.ffn_up.weight'", "(96, 64)", "(128, 64)")


def test_missing_tensor_names_the_tensor(tmp_path: Path) -> None:
    path = _gguf(tmp_path, drop=("blk.1.attn_v.weight",))
    _raises(path, "missing tensor 'blk.1.attn_v.weight'")


def test_unexpected_tensor_names_the_tensor(tmp_path: Path) -> None:
    config, weights = _model("llama")
    path = tmp_path / "m.gguf"
    gw.write_model_gguf(path, config, weights, GPT2_TOKENS)
    contents = read_gguf(path)  # fine as written; now add a stray tensor
    assert contents.config["num_hidden_layers"] == 2
    stray = {"blk.0.attn_qkv.weight": (np.zeros((64, 64), np.float32), "F32")}
    meta = {**gw.model_metadata(config), **GPT2_TOKENS}
    tensors = {gw.gguf_name(k): (v, "F32") for k, v in weights.items()} | stray
    gw.write_gguf(path, meta, tensors)
    _raises(path, "unexpected tensor 'blk.0.attn_qkv.weight'")


def test_split_gguf_is_reported(tmp_path: Path) -> None:
    path = _gguf(tmp_path, extra_metadata={"split.count": 3, "split.no": 0})
    _raises(path, "split into 3 files")


def test_unsupported_architecture_lists_the_supported(tmp_path: Path) -> None:
    path = _gguf(tmp_path, extra_metadata={"general.architecture": "gemma2"})
    _raises(path, "'gemma2'", "gemma3", "llama", "phi3", "qwen2", "qwen3")


def test_unsupported_tensor_type_names_the_tensor(tmp_path: Path) -> None:
    config, weights = _model("llama", intermediate_size=256)
    path = tmp_path / "m.gguf"

    def types(name: str) -> str:
        return "Q2_K" if name == "model.layers.0.mlp.down_proj.weight" else "F32"

    gw.write_model_gguf(path, config, weights, GPT2_TOKENS, types=types)
    _raises(path, "'blk.0.ffn_down.weight'", "Q2_K", "Q4_0", "Q4_K")


def test_unsupported_tokenizer_is_reported(tmp_path: Path) -> None:
    path = _gguf(tmp_path, tokenizer={**GPT2_TOKENS, "tokenizer.ggml.pre": "mystery"})
    _raises(path, "tokenizer.ggml.pre", "'mystery'", "qwen2")
    path = _gguf(tmp_path, name="b.gguf", tokenizer={**GPT2_TOKENS, "tokenizer.ggml.model": "bert"})
    _raises(path, "tokenizer.ggml.model", "'bert'")


def test_missing_metadata_is_reported(tmp_path: Path) -> None:
    config, weights = _model("llama")
    path = tmp_path / "m.gguf"
    meta = {k: v for k, v in gw.model_metadata(config).items() if k != "llama.block_count"}
    tensors = {gw.gguf_name(k): (v, "F32") for k, v in weights.items()}
    gw.write_gguf(path, {**meta, **GPT2_TOKENS}, tensors)
    _raises(path, "llama.block_count")


# ---- the bundled SmolLM2 ----


def test_smollm2_gguf_reads_with_its_tokenizer(default_gguf: Path) -> None:
    contents = read_gguf(default_gguf)
    config = contents.config
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert contents.weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    tok = _tokenizer(contents)
    assert tok.encode("The quick brown fox").tokens == ["The", "Ġquick", "Ġbrown", "Ġfox"]
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    assert contents.config["eos_token_id"] == 2
    assert "<|im_start|>" in contents.tokenizer_config["chat_template"]
    text = "Hello, world! 3.14 — ünïcode\n\ttabs"
    assert tok.decode(tok.encode(text).ids) == text


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_corrupt_header_bytes_give_model_load_error_or_a_model(tmp_path: Path, data: Any) -> None:
    """Any damage to the header is harmless or a ModelLoadError naming the file: never a crash."""
    source = tmp_path / "ok.gguf"
    if not source.exists():
        config, weights = _model("llama")
        gw.write_model_gguf(source, config, weights, GPT2_TOKENS)
    blob = bytearray(source.read_bytes())
    with source.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        header_end = read_header(source, mapped)[2]
    for _ in range(data.draw(st.integers(1, 4))):
        # Mostly the tensor infos at the end; anywhere in the header otherwise.
        low = data.draw(st.sampled_from([4, max(4, header_end - 1500)]))
        blob[data.draw(st.integers(low, header_end - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(blob))
    try:
        read_gguf(path)
    except ModelLoadError as exc:
        message = str(exc)
    else:
        return
    assert str(path) in message


@pytest.mark.parametrize(
    ("pooling_type", "expected"), [(1, "mean"), (2, "cls"), (3, "last"), (0, None)]
)
def test_a_gguf_pooling_type_reaches_the_config(
    tmp_path: Path, pooling_type: int, expected: str | None
) -> None:
    path = _gguf(tmp_path, extra_metadata={"llama.pooling_type": pooling_type})
    assert load_model(path).config.get(POOLING_KEY) == expected
