"""Optimized BLAS for MLX's Linux CPU backend.

MLX's Linux wheel links the reference netlib BLAS, which runs fp32 GEMM at ~6 GFLOP/s on this
class of machine; OpenBLAS runs it at ~400 GFLOP/s. libmlx.so resolves ``cblas_sgemm`` and the
LAPACK symbols through the global symbol namespace, so loading OpenBLAS with ``RTLD_GLOBAL``
*before* ``mlx.core`` is imported makes MLX use it. This module owns that preload; it must run
before anything imports MLX, which is why ``runtime/__init__.py`` calls it first.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import platform
import sys

# Candidates in order of preference. The pthread build uses all cores for one GEMM.
_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_loaded: str | None = None


def preload_blas() -> str | None:
    """Load an optimized BLAS into the global namespace; return its path or ``None``.

    ``MLXRUNNER_BLAS`` names a library explicitly; ``MLXRUNNER_BLAS=none`` disables the preload
    (benchmarks use that to measure the difference).
    """
    global _loaded
    if _loaded is not None or platform.system() != "Linux":
        return _loaded
    if "mlx.core" in sys.modules:
        # Too late to influence symbol resolution; report what we know.
        return _loaded
    wanted = os.environ.get("MLXRUNNER_BLAS", "")
    if wanted.lower() == "none":
        return None
    paths = [wanted] if wanted else [p for pat in _CANDIDATES for p in sorted(glob.glob(pat))]
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        lapack = path.replace("libblas.so.3", "liblapack.so.3")
        if lapack != path and os.path.exists(lapack):
            with contextlib.suppress(OSError):
                ctypes.CDLL(lapack, mode=ctypes.RTLD_GLOBAL)
        _loaded = path
        return path
    return None


def loaded_blas() -> str | None:
    """The BLAS library preloaded by :func:`preload_blas`, if any."""
    return _loaded
