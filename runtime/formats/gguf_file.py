"""The GGUF container: its header parsed and bounds-checked, its tensors decoded to MLX arrays.

``read_header`` reads metadata and tensor infos with every length checked against the file
(a truncated or corrupt file is a ``ModelLoadError`` naming the file and tensor, never a read
past the end). ``to_mlx`` decodes one tensor's bytes with numpy. Every block format whose
values follow one affine map per 32 (``x = scale * code + bias``) becomes MLX's quantized
layout exactly: codes packed as a little-endian bit stream in ``uint32`` words, ``scales`` and
``biases`` in float32, group size 32. That covers Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, and the
K-quants Q4_K and Q5_K (a 256-value super-block is eight such groups). Q6_K keeps one scale per
16 values, finer than MLX's smallest group, so it is decoded to float32. F32, F16 and BF16 are
copied as stored.

``mx.load`` reads GGUF too, but the gguflib it bundles decodes Q4_K wrongly (the high-nibble
sub-blocks take the previous sub-block's scale) and cannot read Q5 types; so it is not used.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from runtime.errors import ModelLoadError

GROUP_SIZE = 32


@attrs.frozen
class GGMLType:
    name: str
    block: int  # values per block
    size: int  # bytes per block
    bits: int | None  # MLX quantization bits, or None when decoded to a dense array


TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4, None),
    1: GGMLType("F16", 1, 2, None),
    2: GGMLType("Q4_0", 32, 18, 4),
    3: GGMLType("Q4_1", 32, 20, 4),
    6: GGMLType("Q5_0", 32, 22, 5),
    7: GGMLType("Q5_1", 32, 24, 5),
    8: GGMLType("Q8_0", 32, 34, 8),
    12: GGMLType("Q4_K", 256, 144, 4),
    13: GGMLType("Q5_K", 256, 176, 5),
    14: GGMLType("Q6_K", 256, 210, None),
    30: GGMLType("BF16", 1, 2, None),
}
OTHER_NAMES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS"}
OTHER_NAMES |= {18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS"}
OTHER_NAMES |= {24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M"}


def type_name(kind: int) -> str:
    return TYPES[kind].name if kind in TYPES else OTHER_NAMES.get(kind, f"type #{kind}")


# ---- header ----


@attrs.frozen
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (the reverse of GGUF's ne[] order)
    kind: int
    offset: int  # from the start of the data section


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


class _Header:
    """A bounds-checked cursor over the file's bytes."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {what}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail("truncated GGUF header")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        # The vocabulary is ~100k strings: one tight loop instead of method calls per item.
        data, pos, size, out = self.data, self.pos, len(self.data), []
        if count > size:
            raise self.fail("truncated GGUF header")
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise self.fail("truncated GGUF header")
            (n,) = unpack(data, pos)
            end = pos + 8 + n
            if end > size:
                raise self.fail("truncated GGUF header")
            out.append(data[pos + 8 : end].decode("utf-8", errors="replace"))
            pos = end
        self.pos = pos
        return out

    def value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            if item == _STRING:
                return self.strings(count)
            raise self.fail(f"metadata {key!r}: unsupported array type {item}")
        raise self.fail(f"metadata {key!r}: unknown value type {kind}")


def read_header(path: Path, data: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo], int]:
    h = _Header(data, path)
    if len(data) < 4 or bytes(data[:4]) != b"GGUF":
        raise h.fail("not a GGUF file (bad magic)")
    h.pos = 4
    version = h.scalar("<I")
    if version not in (2, 3):
        raise h.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = h.scalar("<Q"), h.scalar("<Q")
    if n_tensors > len(data) or n_kv > len(data):
        raise h.fail("corrupt GGUF header (impossible counts)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = h.string()
        metadata[key] = h.value(h.scalar("<I"), key)
    infos = []
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise h.fail(f"tensor {name!r}: {n_dims} dimensions")
        dims = [h.scalar("<Q") for _ in range(n_dims)]
        kind, offset = h.scalar("<I"), h.scalar("<Q")
        infos.append(TensorInfo(name, tuple(reversed(dims)), kind, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise h.fail(f"invalid general.alignment {alignment!r}")
    start = h.pos + (-h.pos % alignment)
    for info in infos:
        _check_tensor(path, info, start, len(data))
    return metadata, infos, start


def _check_tensor(path: Path, info: TensorInfo, start: int, size: int) -> None:
    spec = TYPES.get(info.kind)
    if spec is None:
        supported = ", ".join(t.name for t in TYPES.values())
        raise ModelLoadError(
            f"{path}: tensor {info.name!r} has unsupported type {type_name(info.kind)} "
            f"(supported: {supported})"
        )
    if info.shape[-1] % spec.block:
        raise ModelLoadError(
            f"{path}: tensor {info.name!r} ({spec.name}) has a row of {info.shape[-1]} values, "
            f"not a multiple of {spec.block}"
        )
    end = start + info.offset + nbytes(info)
    if end > size:
        raise ModelLoadError(
            f"{path}: truncated: tensor {info.name!r} needs bytes up to {end}, the file has {size}"
        )


def nbytes(info: TensorInfo) -> int:
    spec = TYPES[info.kind]
    return int(np.prod(info.shape, dtype=np.uint64)) // spec.block * spec.size


# ---- tensor encodings ----

_F16 = ("d", "<f2")
_LAYOUTS: dict[str, list[tuple[str, str] | tuple[str, str, int]]] = {
    "Q4_0": [_F16, ("qs", "u1", 16)],
    "Q4_1": [_F16, ("m", "<f2"), ("qs", "u1", 16)],
    "Q5_0": [_F16, ("qh", "<u4"), ("qs", "u1", 16)],
    "Q5_1": [_F16, ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)],
    "Q8_0": [_F16, ("qs", "i1", 32)],
    "Q4_K": [_F16, ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)],
    "Q5_K": [_F16, ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)],
    "Q6_K": [("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), _F16],
}


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Byte j of a 32-value block holds value j (low nibble) and value j + 16 (high)."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Bit i of a block's 32-bit ``qh`` is the fifth bit of value i."""
    return ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scales(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K super-block, times d and dmin."""
    sc = blk["scales"].astype(np.uint8)
    low, mid, high = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = np.concatenate([low & 63, (high & 0xF) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=1)
    d = blk["d"].astype(np.float32)[:, None]
    dmin = blk["dmin"].astype(np.float32)[:, None]
    return d * scale, dmin * mins


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Sub-block s of 32 values: bytes 32 * (s // 2) onward, low nibbles if s is even."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0xF, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _affine(blk: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [groups, 32], scales [groups], biases [groups]) of an affine block type."""
    d = blk["d"].astype(np.float32)
    if name == "Q8_0":
        return (blk["qs"].astype(np.int16) + 128).astype(np.uint8), d, -128 * d
    if name in ("Q4_0", "Q4_1"):
        codes = _nibbles(blk["qs"])
        return codes, d, blk["m"].astype(np.float32) if name == "Q4_1" else -8 * d
    if name in ("Q5_0", "Q5_1"):
        codes = _nibbles(blk["qs"]) | (_high_bits(blk["qh"]) << 4)
        return codes, d, blk["m"].astype(np.float32) if name == "Q5_1" else -16 * d
    scale, mins = _k_scales(blk)
    codes = _k_low_nibbles(blk["qs"])
    if name == "Q5_K":
        # Bit s of qh[l] is the fifth bit of value l of sub-block s.
        bits = (blk["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        codes = codes | (bits << 4)
    return codes.reshape(-1, 32), scale.reshape(-1), -mins.reshape(-1)


def _q6_k(blk: np.ndarray) -> np.ndarray:
    ql = blk["ql"].reshape(-1, 2, 2, 32)  # [block, half, (values 0-31 | 32-63), 32]
    qh = blk["qh"].reshape(-1, 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # quarters 0..3 of each 128-value half
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.float32) - 32  # [block, half, quarter, 32]
    scales = blk["scales"].reshape(-1, 2, 4, 2, 1).astype(np.float32)  # 16 values per scale
    d = blk["d"].astype(np.float32)[:, None, None, None, None]
    return (d * scales * q.reshape(-1, 2, 4, 2, 16)).reshape(-1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: each row's codes as a little-endian bit stream, read as uint32 words."""
    rows = codes.shape[0]
    if bits == 8:
        return np.ascontiguousarray(codes).view("<u4")
    if bits == 4:
        return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).view("<u4")
    # Eight codes fill ``bits`` bytes exactly.
    eights = codes.reshape(rows, -1, 8).astype(np.uint64)
    words = np.bitwise_or.reduce(eights << (bits * np.arange(8, dtype=np.uint64)), axis=2)
    as_bytes = words.astype("<u8").view(np.uint8).reshape(rows, -1, 8)[:, :, :bits]
    return np.ascontiguousarray(as_bytes).reshape(rows, -1).view("<u4")


def to_mlx(kind: int, raw: np.ndarray, shape: tuple[int, ...]) -> dict[str, mx.array]:
    """The tensor stored as ``raw`` bytes: ``{"weight"}`` dense, or weight/scales/biases."""
    spec = TYPES[kind]
    if spec.name == "F32":
        return {"weight": mx.array(raw.view("<f4").reshape(shape))}
    if spec.name == "F16":
        return {"weight": mx.array(raw.view("<f2").reshape(shape))}
    if spec.name == "BF16":
        return {"weight": mx.array(raw.view("<u2").reshape(shape)).view(mx.bfloat16)}
    blk = raw.view(np.dtype(_LAYOUTS[spec.name]))
    if spec.bits is None:  # Q6_K
        return {"weight": mx.array(_q6_k(blk).reshape(shape))}
    with np.errstate(all="ignore"):  # a corrupt file may hold inf/nan scales: values, not errors
        codes, scales, biases = _affine(blk, spec.name)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    groups = (*shape[:-1], shape[-1] // GROUP_SIZE)
    return {
        "weight": mx.array(pack(codes.reshape(rows, -1), spec.bits).reshape(*shape[:-1], -1)),
        "scales": mx.array(scales.reshape(groups)),
        "biases": mx.array(biases.reshape(groups)),
    }
