"""GGUF files as hostile input: every malformed file is a ``ModelLoadError`` naming the file.

Counts and lengths from the file are bounded before they size a loop or an allocation, tensor
sizes are Python integers checked against the file, tensor data must sit where llama.cpp
expects it, tokens are capped, and whatever else a damaged file makes the parser raise is
reported as ``ModelLoadError`` too. The broken files are built with ``tests/gguf_writer.py``
or by patching a valid file's bytes.
"""

from __future__ import annotations

import mmap
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime.formats.gguf
import runtime.formats.gguf_file
from runtime.errors import ModelLoadError
from runtime.formats.gguf import read_gguf
from runtime.formats.gguf_file import read_header
from runtime.formats.gguf_tokenizer import MAX_TOKEN_BYTES, build_tokenizer
from runtime.testing.models import random_weights, tiny_config
from tests import gguf_writer as gw

TOKENS = gw.gpt2_tokenizer_metadata()
VOCAB = len(TOKENS["tokenizer.ggml.tokens"])
_STR, _ARR, _I32 = 8, 9, 5


CONFIG = tiny_config("llama", vocab_size=VOCAB)


def _write(path: Path, **kwargs: Any) -> dict[str, bytes]:
    """A tiny llama GGUF; GGUF tensor name -> its bytes."""
    weights = {k: np.array(v) for k, v in random_weights(CONFIG, seed=0).items()}
    tokenizer = kwargs.pop("tokenizer", TOKENS)
    return gw.write_model_gguf(path, CONFIG, weights, tokenizer, **kwargs)


def _model_gguf(path: Path, **kwargs: Any) -> Path:
    _write(path, **kwargs)
    return path


def _raises(path: Path, *needles: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        read_gguf(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


def _loads_or_refuses(path: Path) -> None:
    """The only two outcomes allowed for a damaged file."""
    try:
        read_gguf(path)
    except ModelLoadError as exc:
        message = str(exc)
    else:
        return
    assert str(path) in message


def _header_end(path: Path) -> int:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return read_header(path, data)[2]


# ---- counts and lengths ----


def test_huge_block_count_is_bounded_by_the_tensor_count(tmp_path: Path) -> None:
    # Unbounded, it would size the loop over expected tensor names: 2**40 iterations.
    path = _model_gguf(tmp_path / "m.gguf", extra_metadata={"llama.block_count": gw.U64(2**40)})
    _raises(path, "llama.block_count = 1099511627776", "tensors")


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("tokenizer.ggml.merges", struct.pack("<IQ", _STR, 2**62)),
        ("tokenizer.ggml.scores", struct.pack("<IQ", _I32, 2**61)),  # 2**63 bytes: wraps in C
        ("general.tags", struct.pack("<IQ", _I32, 2**24 + 1)),  # over the cap on items
        ("general.name", struct.pack("<Q", 2**40) + b"x"),  # a string past the end
    ],
    ids=["strings", "numbers", "over-the-cap", "string"],
)
def test_huge_array_or_string_lengths_are_refused(tmp_path: Path, key: str, raw: bytes) -> None:
    value_type = _STR if key == "general.name" else _ARR
    meta = {key: gw.Raw(value_type, raw)}
    path = _model_gguf(tmp_path / "m.gguf", extra_metadata=meta)
    _raises(path, repr(key), "truncated or corrupt")


@pytest.mark.parametrize("field", [8, 16])  # the tensor count, the metadata count
def test_huge_header_counts_are_refused_before_any_loop(tmp_path: Path, field: int) -> None:
    path = _model_gguf(tmp_path / "m.gguf")
    blob = bytearray(path.read_bytes())
    blob[field : field + 8] = struct.pack("<Q", 2**63)
    path.write_bytes(bytes(blob))
    _raises(path, "cannot fit")


def test_a_string_over_the_cap_is_refused_even_inside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.formats.gguf_file, "MAX_STRING_BYTES", 1000)
    path = _model_gguf(tmp_path / "m.gguf", extra_metadata={"general.name": "x" * 1001})
    _raises(path, "'general.name' is 1001 bytes long (at most 1000)")
    tokens = {
        **TOKENS,
        "tokenizer.ggml.tokens": [*TOKENS["tokenizer.ggml.tokens"][:-1], "y" * 1001],
    }
    path = _model_gguf(tmp_path / "t.gguf", tokenizer=tokens)
    _raises(path, f"'tokenizer.ggml.tokens'[{VOCAB - 1}] is 1001 bytes long")


def test_duplicate_keys_and_long_tensor_names_are_refused(tmp_path: Path) -> None:
    path = _model_gguf(tmp_path / "m.gguf", extra_metadata={"general.namf": "ab"})
    # A key of the same length: the file stays well formed, one key now appears twice.
    path.write_bytes(path.read_bytes().replace(b"general.namf", b"general.name"))
    _raises(path, "duplicate metadata key 'general.name'")
    long_name = "blk.0." + "x" * 60
    stray = {long_name: (np.zeros(32, np.float32), "F32")}
    path = _model_gguf(tmp_path / "n.gguf", extra_tensors=stray)
    _raises(path, "the name of tensor", "at most 63")


# ---- tensor sizes and offsets ----


def test_dims_whose_product_overflows_int64_are_refused(tmp_path: Path) -> None:
    # 2**32 * 2**32 wraps to 0 in uint64 arithmetic: the tensor would seem to need no bytes.
    shapes = {"output_norm.weight": (2**32, 2**32)}
    path = _model_gguf(tmp_path / "m.gguf", shapes=shapes)
    _raises(path, "'output_norm.weight'", "more than 2**63 values")


def test_a_tensor_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    last = list(_write(path))[-1]
    size = path.stat().st_size
    # 2**31 x 2**31 values fit an int64 count, but not the file.
    path = _model_gguf(tmp_path / "big.gguf", shapes={last: (2**31, 2**31)})
    _raises(path, "truncated", f"tensor {last!r}", f"the file has {size}")


def test_misaligned_or_overlapping_offsets_are_refused(tmp_path: Path) -> None:
    # Without the check the tensor would be read from the wrong bytes and load as garbage.
    second = "blk.0.attn_k.weight"
    blobs = _write(tmp_path / "ok.gguf", types=lambda _: "F32")
    names = list(blobs)
    expected = sum(len(blobs[n]) + (-len(blobs[n]) % 32) for n in names[: names.index(second)])
    for offset, needle in [(expected + 4, "expected"), (0, "expected"), (2**63, "expected")]:
        path = _model_gguf(tmp_path / "m.gguf", types=lambda _: "F32", offsets={second: offset})
        _raises(path, f"tensor {second!r} has data offset {offset}", needle)


def test_unknown_tensor_type_is_named(tmp_path: Path) -> None:
    path = _model_gguf(tmp_path / "m.gguf", type_ids={"output_norm.weight": 99})
    _raises(path, "'output_norm.weight'", "unsupported type #99", "Q4_K")


# ---- metadata values ----


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("llama.rope.freq_base", float("nan")),
        ("llama.attention.layer_norm_rms_epsilon", -1e-5),
        ("llama.rope.freq_base", gw.F64Value(1e300)),  # inf as the model's float32
    ],
)
def test_non_finite_or_negative_float_metadata_is_refused(
    tmp_path: Path, key: str, value: float
) -> None:
    path = _model_gguf(tmp_path / "m.gguf", extra_metadata={key: value})
    _raises(path, key, "is not valid")


def test_a_huge_head_dimension_never_sizes_an_array(tmp_path: Path) -> None:
    # With rope_freqs present, the head dimension used to size np.arange before any check.
    factors = {"rope_freqs.weight": (np.ones(8, np.float32), "F32")}
    meta = {
        "llama.attention.key_length": gw.U64(2**50),
        "llama.rope.dimension_count": gw.U64(2**50),
    }
    path = _model_gguf(tmp_path / "m.gguf", extra_metadata=meta, extra_tensors=factors)
    _raises(path, "rope_freqs.weight", "positive factors")
    path = _model_gguf(tmp_path / "odd.gguf", extra_metadata={"llama.attention.key_length": 15})
    _raises(path, "head dimension 15 is odd")


def test_strings_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    path = _model_gguf(tmp_path / "m.gguf", extra_metadata={"general.name": "tiny model"})
    path.write_bytes(path.read_bytes().replace(b"tiny model", b"tiny \xffodel"))
    _raises(path, "metadata 'general.name' is not UTF-8")
    token = TOKENS["tokenizer.ggml.tokens"][-1]
    path = _model_gguf(tmp_path / "t.gguf")
    blob = path.read_bytes()
    at = blob.index(struct.pack("<Q", len(token.encode())) + token.encode())
    cut = at + 8 + len(token.encode()) - 1
    path.write_bytes(blob[:cut] + b"\xc3" + blob[cut + 1 :])  # a lead byte with no follower
    _raises(path, f"'tokenizer.ggml.tokens'[{VOCAB - 1}] is not UTF-8")


def test_token_length_is_capped(tmp_path: Path) -> None:
    meta = {k: list(v) if isinstance(v, np.ndarray) else v for k, v in TOKENS.items()}
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 4]  # user-defined
    fits = "é" * (MAX_TOKEN_BYTES // 2)  # 1024 bytes of UTF-8
    meta["tokenizer.ggml.tokens"] = [*TOKENS["tokenizer.ggml.tokens"], fits]
    build_tokenizer(tmp_path / "t.gguf", meta, VOCAB + 1)
    meta["tokenizer.ggml.tokens"] = [*TOKENS["tokenizer.ggml.tokens"], fits + "x"]
    with pytest.raises(ModelLoadError, match=f"token {VOCAB} .* 1025 bytes long"):
        build_tokenizer(tmp_path / "t.gguf", meta, VOCAB + 1)


def test_any_other_parse_failure_is_a_model_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _model_gguf(tmp_path / "m.gguf")

    def broken(*_: Any) -> Any:
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(runtime.formats.gguf, "to_mlx", broken)
    _raises(path, "corrupt GGUF file (IndexError: index 7 is out of bounds)")


# ---- truncation and random damage ----


def _small_gguf(path: Path) -> Path:
    """A GGUF file of a few hundred bytes whose last tensor ends exactly at the end."""
    meta = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.scores": np.array([0.0, -1.0, -2.0], np.float32),
    }
    tensors = {
        "a.weight": (np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), "Q8_0"),
        "b.weight": (np.arange(8, dtype=np.float32), "F32"),
    }
    gw.write_gguf(path, meta, tensors)
    return path


def test_truncation_at_every_offset_is_a_model_load_error(tmp_path: Path) -> None:
    source = _small_gguf(tmp_path / "small.gguf")
    blob = source.read_bytes()
    with source.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        read_header(source, data)  # the whole file is well formed
    path = tmp_path / "cut.gguf"
    for keep in range(len(blob)):
        path.write_bytes(blob[:keep])
        expected = "empty" if keep == 0 else "bad magic" if keep < 4 else "truncated"
        _raises(path, expected)


def test_truncating_a_model_anywhere_is_a_model_load_error(tmp_path: Path) -> None:
    blob = _model_gguf(tmp_path / "m.gguf").read_bytes()
    rng = random.Random(11)
    header = _header_end(tmp_path / "m.gguf")
    cuts = [
        *range(0, 64),
        *rng.sample(range(64, header), 80),
        *rng.sample(range(header, len(blob)), 40),
    ]
    path = tmp_path / "cut.gguf"
    for keep in cuts:
        path.write_bytes(blob[:keep])
        _raises(path)


def test_random_byte_flips_load_or_give_model_load_error(tmp_path: Path) -> None:
    """Seeded damage anywhere in a small model file: it loads, or it is a ModelLoadError."""
    source = _model_gguf(tmp_path / "m.gguf")
    blob = source.read_bytes()
    header = _header_end(source)
    rng = random.Random(2024)
    path = tmp_path / "flipped.gguf"
    for _ in range(120):
        damaged = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(4, header) if rng.random() < 0.7 else rng.randrange(len(blob))
            damaged[at] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        _loads_or_refuses(path)
