"""Quantized linear layers that keep MLX's fast CUDA kernel for every batch size.

MLX's CUDA ``quantized_matmul`` picks its kernel by the shape of the input: one row goes to a
matrix-vector kernel, and a 2-D input of 8 or more rows to a tiled matrix-matrix kernel. A
decode step's input is ``[rows, 1, D]`` (one token per sequence), which MLX treats as ``rows``
separate one-row products, and 2 to 7 rows also take a slow path: in both cases the cost grows
with every row (on an H200 with a 4-bit 8B llama, a decode step took 6 ms at one row and
195 ms at 64 rows, so batching bought nothing). Measured on the same weights
(``bench/gpu_qmm.py``), the 32 layers' matmuls took 4.7 ms at 1 row, 16 ms at 4 rows as 2-D,
and 4.3 ms at 8 and at 16 rows.

``QuantizedLinear`` therefore flattens its input to 2-D and pads 2 to 7 rows to 8 (the padding
rows are zeros, computed and dropped) on CUDA. It keeps the parameters, the checkpoint names
and the single-row path of ``nn.QuantizedLinear``; ``adopt_quantized_linears`` swaps it in
after ``nn.quantize``. Metal and the CPU keep MLX's behaviour as it is.
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx
import mlx.nn as nn

TILE_ROWS = 8  # MLX's tiled kernel is used from this many rows of a 2-D input


@cache
def _cuda() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def on_cuda() -> bool:
    """Whether arrays are computed by MLX's CUDA backend here."""
    return _cuda() and mx.default_device() == mx.gpu


def _reshaped(x: mx.array) -> bool:
    """Whether ``x`` needs the 2-D, padded form: CUDA, several rows, not already that form."""
    rows = math.prod(x.shape[:-1])
    if rows == 1 or (x.ndim == 2 and rows >= TILE_ROWS):
        return False  # checked first: this runs for every layer of every batch-1 step
    return on_cuda()


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose many-row calls reach MLX's tiled CUDA kernel (see above)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _reshaped(x):
            out: mx.array = super().__call__(x)
            return out
        lead = x.shape[:-1]
        rows = math.prod(lead)
        flat = x.reshape(rows, x.shape[-1])
        if rows < TILE_ROWS:
            flat = mx.pad(flat, [(0, TILE_ROWS - rows), (0, 0)])
        y = mx.quantized_matmul(
            flat,
            self["weight"],
            scales=self["scales"],
            biases=self.get("biases"),
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        if rows < TILE_ROWS:
            y = y[:rows]
        y = y.reshape(*lead, y.shape[-1])
        if "bias" in self:
            y = y + self["bias"]
        return y


def adopt(layer: nn.QuantizedLinear) -> QuantizedLinear:
    """The same layer (same arrays, no copy) as a ``QuantizedLinear``."""
    if isinstance(layer, QuantizedLinear):
        return layer
    out = QuantizedLinear.__new__(QuantizedLinear)
    nn.Module.__init__(out)
    for key, value in layer.items():  # the arrays, shared
        out[key] = value
    out.group_size, out.bits, out.mode = layer.group_size, layer.bits, layer.mode
    out.freeze()
    return out


def adopt_quantized_linears(model: nn.Module) -> int:
    """Swap every ``nn.QuantizedLinear`` in ``model`` for a ``QuantizedLinear``; returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        for key, child in list(module.items()):
            if isinstance(child, nn.QuantizedLinear) and not isinstance(child, QuantizedLinear):
                module[key] = adopt(child)
                swapped += 1
    return swapped
