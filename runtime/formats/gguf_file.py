"""The GGUF container read as hostile input: metadata and tensor infos, every count and length
bounded before it sizes a loop or an allocation.

``read_header`` returns the metadata as plain Python values, the tensor infos and where the data
section starts, or raises ``ModelLoadError`` naming the file and what is wrong; nothing else
escapes it. The rules, llama.cpp's own (``gguf.cpp``) where it has one:

- counts (metadata entries, tensors, array items) are checked against the bytes left in the
  file, at the smallest size each item could take, before anything is read;
- a string is at most ``MAX_STRING_BYTES`` and valid UTF-8, as the format says; an array has
  at most ``MAX_ARRAY_ITEMS`` items; a tensor name at most 63 bytes (``GGML_MAX_NAME``); keys
  and tensor names are unique;
- a tensor has 1 to 4 dimensions, fewer than 2**63 values, a known type and whole blocks per
  row; its size is computed with Python integers (no wrap-around), and its data must start
  where the previous tensor's ends, padded to ``general.alignment`` (what llama.cpp
  requires) and end inside the file.

Decoding the tensors' bytes is ``runtime.formats.gguf_blocks``.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from runtime.errors import ModelLoadError

# A metadata string: the longest real ones are chat templates, tens of KiB (llama.cpp: 1 GiB).
MAX_STRING_BYTES = 16 << 20
# A metadata array: 64 times the largest vocabularies (about 262k tokens; llama.cpp: 2**30).
MAX_ARRAY_ITEMS = 1 << 24
MAX_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME (64) less its NUL
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# The fewest bytes one metadata entry (key length, type, a u8) and one tensor info (name
# length, dimension count, one dimension, type, offset) can take.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_INFO_BYTES = 8 + 4 + 8 + 4 + 8


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
    return TYPES[kind].name if kind in TYPES else OTHER_NAMES.get(kind, f"#{kind}")


@attrs.frozen
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (the reverse of GGUF's ne[] order)
    kind: int
    offset: int  # from the start of the data section


def nbytes(info: TensorInfo) -> int:
    """The tensor's size in the file (Python integers: no overflow however large the dims)."""
    spec = TYPES[info.kind]
    return math.prod(info.shape) // spec.block * spec.size


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_NUMPY |= {10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")


class _Header:
    """A bounds-checked cursor over the file's bytes."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {what}")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.fail(
                f"truncated GGUF header: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.left} more"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n, limit = self.scalar("<Q", what), limit or MAX_STRING_BYTES
        if n > limit:
            raise self.fail(
                f"truncated or corrupt GGUF header: {what} is {n} bytes long (at most {limit})"
            )
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"corrupt GGUF header: {what} is not UTF-8 ({exc})") from None

    def strings(self, count: int, what: str) -> list[str]:
        # The vocabulary is ~100k strings: one tight loop instead of method calls per item.
        data, pos, size, out = self.data, self.pos, len(self.data), []
        unpack = _LENGTH.unpack_from
        for i in range(count):
            if pos + 8 > size:
                raise self.fail(f"truncated GGUF header: {what} ends after {i} of {count} items")
            (n,) = unpack(data, pos)
            end = pos + 8 + n
            if n > MAX_STRING_BYTES or end > size:
                self.pos = pos
                raise self.fail(
                    f"truncated or corrupt GGUF header: {what}[{i}] is {n} bytes long at "
                    f"offset {pos}, the file has {size - pos - 8} more"
                )
            try:
                out.append(data[pos + 8 : end].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise self.fail(f"corrupt GGUF header: {what}[{i}] is not UTF-8 ({exc})") from None
            pos = end
        self.pos = pos
        return out

    def value(self, kind: int, key: str) -> Any:
        what = f"metadata {key!r}"
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY:
            raise self.fail(f"{what}: unknown value type {kind}")
        item, count = self.scalar("<I", what), self.scalar("<Q", what)
        if item not in _NUMPY and item != _STRING:
            raise self.fail(f"{what}: unsupported array item type {item}")
        item_size = np.dtype(_NUMPY[item]).itemsize if item in _NUMPY else 8  # string: length
        if count > MAX_ARRAY_ITEMS or count * item_size > self.left:
            raise self.fail(
                f"truncated or corrupt GGUF header: {what} claims {count} items; the file has "
                f"{self.left} bytes left (at most {MAX_ARRAY_ITEMS} items)"
            )
        if item == _STRING:
            return self.strings(count, what)
        raw = self.take(count * item_size, what)
        return np.frombuffer(raw, _NUMPY[item]).tolist()


def read_header(path: Path, data: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo], int]:
    """(metadata, tensor infos, offset of the data section); see the module doc for the checks."""
    h = _Header(data, path)
    if len(data) < 4 or bytes(data[:4]) != b"GGUF":
        raise h.fail("not a GGUF file (bad magic)")
    h.pos = 4
    version = h.scalar("<I", "the version")
    if version not in (2, 3):
        raise h.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = h.scalar("<Q", "the tensor count"), h.scalar("<Q", "the metadata count")
    if n_tensors * _MIN_INFO_BYTES + n_kv * _MIN_KV_BYTES > h.left:
        raise h.fail(
            f"truncated or corrupt GGUF header: {n_tensors} tensors and {n_kv} metadata entries "
            f"cannot fit in the {h.left} bytes left"
        )
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = h.string(f"metadata key #{i}")
        if key in metadata:
            raise h.fail(f"corrupt GGUF header: duplicate metadata key {key!r}")
        metadata[key] = h.value(h.scalar("<I", f"metadata {key!r}"), key)
    infos = [_tensor_info(h, i) for i in range(n_tensors)]
    if len({info.name for info in infos}) != len(infos):
        raise h.fail("corrupt GGUF header: duplicate tensor names")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise h.fail(f"invalid general.alignment {alignment!r} (a power of two)")
    start = h.pos + (-h.pos % alignment)
    expected = 0
    for info in infos:
        expected = _check_tensor(path, info, start, len(data), expected, alignment)
    return metadata, infos, start


def _tensor_info(h: _Header, index: int) -> TensorInfo:
    name = h.string(f"the name of tensor #{index}", MAX_NAME_BYTES)
    what = f"tensor {name!r}"
    n_dims = h.scalar("<I", what)
    if not 1 <= n_dims <= MAX_DIMS:
        raise h.fail(f"{what}: {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = [h.scalar("<Q", what) for _ in range(n_dims)]
    if math.prod(dims) >= 1 << 63:  # llama.cpp counts values in an int64
        raise h.fail(f"{what}: dimensions {dims} hold more than 2**63 values")
    kind, offset = h.scalar("<I", what), h.scalar("<Q", what)
    return TensorInfo(name, tuple(reversed(dims)), kind, offset)


def _check_tensor(
    path: Path, info: TensorInfo, start: int, size: int, expected: int, alignment: int
) -> int:
    """Check one tensor's type, shape and place; return where the next one must start."""
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
    if info.offset != expected:
        raise ModelLoadError(
            f"{path}: corrupt GGUF header: tensor {info.name!r} has data offset {info.offset}, "
            f"expected {expected} (tensors follow each other, aligned to {alignment} bytes)"
        )
    length = nbytes(info)
    end = start + info.offset + length
    if end > size:
        raise ModelLoadError(
            f"{path}: truncated: tensor {info.name!r} needs bytes up to {end}, the file has {size}"
        )
    return info.offset + length + (-length % alignment)
