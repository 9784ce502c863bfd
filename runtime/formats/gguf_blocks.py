"""GGUF block formats decoded to MLX arrays: ``to_mlx`` turns one tensor's bytes into arrays.

Every block format whose values follow one affine map per 32 (``x = scale * code + bias``)
becomes MLX's quantized layout exactly: codes packed as a little-endian bit stream in
``uint32`` words, ``scales`` and ``biases`` in float32, group size 32. That covers Q4_0, Q4_1,
Q8_0, Q5_0, Q5_1, and the K-quants Q4_K and Q5_K (a 256-value super-block is eight such
groups). Q6_K keeps one scale per 16 values, finer than MLX's smallest group, so it is decoded
to float32. F32, F16 and BF16 are copied as stored. The bytes' length and the shape were
checked against the type by ``runtime.formats.gguf_file``.

``mx.load`` reads GGUF too, but the gguflib it bundles decodes Q4_K wrongly (the high-nibble
sub-blocks take the previous sub-block's scale) and cannot read Q5 types; so it is not used.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from runtime.formats.gguf_file import TYPES

GROUP_SIZE = 32

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
