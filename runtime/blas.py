"""Optimized BLAS for MLX's Linux CPU backend.

MLX's Linux wheel links the reference netlib BLAS, which runs fp32 GEMM at ~6 GFLOP/s on this
class of machine; OpenBLAS runs it at ~400 GFLOP/s. libmlx.so resolves ``cblas_sgemm`` and the
LAPACK symbols through the global symbol namespace, so loading OpenBLAS with ``RTLD_GLOBAL``
*before* ``mlx.core`` is imported makes MLX use it. This module owns that preload; it must run
before anything imports MLX, which is why ``runtime/__init__.py`` calls it first.

OpenBLAS is slow on the few rows of a batched decode step, and BLIS is fast there but slow on
a long prompt's rows. So where both are installed (``scripts/setup-blas.sh``) and
``scripts/build-sgemm.sh`` has built ``runtime/native/sgemm_dispatch.c``, that small library
goes first: it exports the ``cblas_sgemm`` MLX calls and hands each product to one of the two
by its row count (the C file has the measurements). OpenBLAS serves everything else.
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

_BLIS = (
    "/usr/lib/*-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib64/libblis.so.4",
)
# Products of at most this many rows go to BLIS (``MLXRUNNER_SKINNY_ROWS``; 0: OpenBLAS only).
# On the 2-core CI machine BLIS on one thread was ahead up to 8 rows and behind from 16 (at 12
# the two were within noise), measured on SmolLM2-135M's matrices.
SKINNY_ROWS = 12
SHIM_NAME = "libmlxrunner_sgemm.so"

_loaded: str | None = None
_skinny: str | None = None


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
        if not wanted:
            _load_dispatch(path)  # before OpenBLAS: its cblas_sgemm must be found first
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


def skinny_blas() -> str | None:
    """The library that takes products of few rows (BLIS), when the dispatch is in place."""
    return _skinny


def shim_path() -> str:
    """Where ``scripts/build-sgemm.sh`` builds the dispatch library: the environment's lib/."""
    return os.environ.get("MLXRUNNER_SGEMM_SHIM") or os.path.join(sys.prefix, "lib", SHIM_NAME)


def _load_dispatch(openblas: str) -> None:
    """Put the row-count dispatch ahead of ``openblas`` in the global namespace when the
    library, BLIS and OpenBLAS are all there; otherwise leave everything to OpenBLAS."""
    global _skinny
    rows = int(os.environ.get("MLXRUNNER_SKINNY_ROWS", SKINNY_ROWS))
    shim = shim_path()
    blis = next((p for pat in _BLIS for p in sorted(glob.glob(pat))), None)
    if rows < 1 or blis is None or not os.path.exists(shim):
        return
    try:
        local = ctypes.CDLL(shim, mode=ctypes.RTLD_LOCAL)
        if local.mlxrunner_sgemm_init(openblas.encode(), blis.encode(), rows) != 0:
            return
        # Only now global, so a failed init never leaves a cblas_sgemm that goes nowhere.
        ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except (OSError, AttributeError):
        return
    _skinny = blis
